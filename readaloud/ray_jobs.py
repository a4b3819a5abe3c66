"""Run the folds on a Ray cluster: `train.py --ray`, `check_models.py --retrain --ray`, `infer.py --ray`.

Why Ray: a competition run is 10 variants x 6 folds of Whisper small/medium, tens of GPU-hours.
The folds are independent, so an existing scheduler places them on the machines of a cluster
(CPUs and GPUs per fold, fractions allowed: two small folds can share a GPU), retries a fold
whose worker or node dies and reports the others, instead of a launcher of our own.

A fold task runs exactly the command train.py's runner runs for that fold,
`python train_model<v>.py --fold K --n_folds N --data ... --assets ... <overrides>`, as a
subprocess in the repo root of its node, output appended to assets/runs/<v>_<K>/stdout.log.
The fold script resumes from its last checkpoint (bit-identically), so a retried fold goes on
where the dead one stopped; a retry drops --force/--restart/--resume once the first attempt
has written a checkpoint of its own, else the retry would throw that work away.

A cluster needs the repo and its venv, the data, the TTS cache and the assets folder at the same
absolute paths on every node (shared storage such as NFS; a local cluster shares them
trivially). Each task first reads a token the driver wrote into assets/.ray/ and refuses to
start a fold that could not write where the driver reads.

The task functions are shipped to the workers by value and use only the standard library, so
a worker neither imports torch nor needs the package on its path: the fold script does that.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tqdm.auto import tqdm

from .layout import FoldPaths
from .pipeline.runner import fold_specs, script_for

ROOT = Path(__file__).resolve().parent.parent
RAY_PIN = "ray[default]==2.60.0"
RAY_DIR = ".ray"                 # under assets: the driver's token and each fold's attempt record
KILLED_EXIT_CODES = (137, 143)   # SIGKILL / SIGTERM as a shell or a container reports them
# the driver's settings a fold needs wherever it runs (fault hooks, offline hub, tqdm)
FORWARDED_ENV_PREFIXES = ("READALOUD_", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_VERBOSITY",
                          "TQDM_DISABLE", "WANDB_MODE")
ONE_SHOT_FLAGS = ("--force", "--restart")  # a retry that resumes must not repeat them (nor --resume PATH)
LOCAL_OBJECT_STORE = 256 * 1024 ** 2       # the tasks pass file names and small tables, never weights
MAX_RETRIES = 3


class RayJobError(RuntimeError):
    """The cluster cannot run the request (Ray missing, no node fits a fold, assets not shared)."""


def add_ray_options(p, unit: str = "fold") -> None:
    """--ray [ADDRESS], --cpus_per_<unit>, --gpus_per_<unit> on an entry point's parser."""
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run each %s as a Ray task: without a value on a local cluster (this machine's cores, "
                        "loopback), 'auto' joins the running cluster, or give its address (host:port)" % unit)
    p.add_argument(f"--cpus_per_{unit}", type=float, default=1.0,
                   help=f"CPUs Ray reserves per {unit} (default 1; also its torch threads, at least 1)")
    p.add_argument(f"--gpus_per_{unit}", type=float, default=0.0,
                   help=f"GPUs per {unit}, fractions allowed: 0.5 puts two on one GPU (default 0: CPU)")


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise RayJobError(f"--ray needs Ray: pip install \"{RAY_PIN}\" ({exc})") from exc
    return ray


def connect(address: str | None, local_cpus: int | None = None):
    """Join the cluster at `address` ('auto': the running one) or start a local one ('local' or
    None: `local_cpus` CPUs, default all, on loopback, no dashboard). Returns the ray module."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address in (None, "", "local"):
        ray.init(address="local", num_cpus=local_cpus or os.cpu_count() or 1, include_dashboard=False,
                 _node_ip_address="127.0.0.1", object_store_memory=LOCAL_OBJECT_STORE)
    else:
        ray.init(address=address)
    return ray


def check_fits(ray, cpus: float, gpus: float, unit: str = "fold") -> None:
    """Refuse a request no node can meet: Ray would keep such a task pending for ever."""
    if cpus <= 0 or gpus < 0:
        raise RayJobError(f"--cpus_per_{unit} {cpus} / --gpus_per_{unit} {gpus}: CPUs must be > 0, GPUs >= 0")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    have = [(n.get("NodeManagerAddress", "?"), n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0))
            for n in nodes]
    if not any(c >= cpus and g >= gpus for _, c, g in have):
        listed = ", ".join(f"{a}: {c:g} CPU {g:g} GPU" for a, c, g in have) or "none alive"
        raise RayJobError(f"no node of the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs for one {unit} "
                          f"(nodes: {listed}); lower --cpus_per_{unit}/--gpus_per_{unit} or add a node")


def write_driver_token(assets: Path) -> tuple[Path, str]:
    """A fresh token in assets/.ray/driver: a task that cannot read it is not on the driver's storage."""
    from .checkpoints import atomic_write  # torch with it; the driver has imported it already
    folder = assets / RAY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    atomic_write(folder / "driver", token)
    return folder / "driver", token


def fold_argv(variant: str, fold: int, n_folds: int, data: str, assets: str, tts_dir: str,
              own: list[str], extra: list[str], threads: int) -> list[str]:
    """The fold's command after the interpreter, as train.py's runner builds it."""
    argv = [str(script_for(variant)), "--fold", str(fold), "--n_folds", str(n_folds), "--data", str(data),
            "--assets", str(assets), "--tts_dir", str(tts_dir), "--no_progress", "--quiet", *own, *extra]
    return argv + ([] if "--threads" in argv else ["--threads", str(threads)])


def forwarded_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    return env | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


# ---- worker side: standard library only, shipped by value ---------------------------------------

def _die_with_parent() -> None:
    """In the fold process before exec: die when the Ray worker that started it dies (Linux), so
    a killed worker leaves no orphan training next to the retry."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _file_state(path: str) -> list | None:
    try:
        st = os.stat(path)
        return [st.st_mtime_ns, st.st_size, st.st_ino]
    except OSError:
        return None


def _without_one_shot(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ONE_SHOT_FLAGS:
            continue
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            out.append(a)
    return out


def _attempt_argv(argv: list[str], record: str, token: str, last: str) -> tuple[list[str], int]:
    """(the argv of this attempt, its number). The first attempt records the state of the fold's
    last.pth; a retry that finds a different one resumes from it without the one-shot options."""
    try:
        with open(record) as f:
            seen = json.load(f)
    except (OSError, ValueError):
        seen = {}
    if seen.get("token") != token:
        seen = {"token": token, "last": _file_state(last), "attempt": 0}
    seen["attempt"] += 1
    resumable = seen["attempt"] > 1 and _file_state(last) not in (None, seen["last"])
    tmp = f"{record}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(seen, f)
    os.replace(tmp, record)
    return (_without_one_shot(argv) if resumable else argv), seen["attempt"]


def _tail_of(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "\n".join("    " + line for line in f.read().splitlines()[-n:])
    except OSError:
        return ""


def run_fold_process(argv: list[str], cwd: str, env: dict, log: str, record: str, last: str,
                     token_file: str, token: str) -> dict:
    """One attempt at one fold, on a Ray worker: `python <argv>` in `cwd`, output appended to `log`.
    Raises CalledProcessError when the process was killed (Ray retries it); returns its exit code
    otherwise, with the tail of its log."""
    host = socket.gethostname()
    try:
        with open(token_file) as f:
            seen = f.read().strip()
    except OSError:
        seen = None
    if seen != token or not os.path.isdir(cwd):
        return {"code": -1, "node": host, "seconds": 0.0, "tail": "",
                "error": f"node {host} does not see the driver's files ({token_file} "
                         f"{'unreadable' if seen is None else 'from another run'}, repo {cwd} "
                         f"{'present' if os.path.isdir(cwd) else 'missing'}): put the repo, data and assets "
                         f"on storage every node mounts at the same path"}
    os.makedirs(os.path.dirname(log), exist_ok=True)
    argv, attempt = _attempt_argv(argv, record, token, last)
    start = time.time()
    with open(log, "ab") as out:
        out.write(f"[ray] attempt {attempt} on {host} (worker pid {os.getpid()}): {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen([sys.executable, *argv], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **env}, preexec_fn=_die_with_parent)
    try:
        code = proc.wait()
    except BaseException:  # cancelled: the fold goes with the task
        proc.kill()
        raise
    if code < 0 or code in KILLED_EXIT_CODES:
        with open(log, "ab") as out:
            out.write(f"[ray] the fold process was killed (exit {code}): Ray retries it\n".encode())
        raise subprocess.CalledProcessError(code, argv)
    return {"code": code, "node": host, "seconds": time.time() - start, "tail": _tail_of(log) if code else ""}


# ---- driver side -------------------------------------------------------------------------------

def run_jobs_on_ray(variants: list[str], folds: list[int], n_folds: int, data: str, assets: str, tts_dir: str,
                    extra: list[str] | None = None, force: bool = False, address: str | None = None,
                    cpus_per_fold: float = 1.0, gpus_per_fold: float = 0.0, progress: bool = True,
                    poll: float = 2.0) -> dict[str, int]:
    """train.py --ray: every (variant, fold) not finished yet as a Ray task. Returns {stem: exit code}."""
    specs, results = fold_specs(variants, folds, assets, force)
    return results | run_fold_jobs_on_ray(specs, n_folds, data, assets, tts_dir, extra, address,
                                          cpus_per_fold, gpus_per_fold, progress, poll)


def run_fold_jobs_on_ray(specs: list[tuple[str, int, list[str]]], n_folds: int, data: str, assets: str,
                         tts_dir: str, extra: list[str] | None = None, address: str | None = None,
                         cpus_per_fold: float = 1.0, gpus_per_fold: float = 0.0, progress: bool = True,
                         poll: float = 2.0, max_retries: int = MAX_RETRIES) -> dict[str, int]:
    """Each (variant, fold, its own options) as a Ray task with the resources asked for; `extra`
    options go to every fold. Returns {stem: exit code} (-1: no exit code, e.g. the node died)."""
    if not specs:
        return {}
    data, assets, tts_dir = (str(Path(p).resolve()) for p in (data, assets, tts_dir))
    ray = connect(address)
    check_fits(ray, cpus_per_fold, gpus_per_fold)
    token_file, token = write_driver_token(Path(assets))
    threads = max(1, int(cpus_per_fold))
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import the package
    task = ray.remote(run_fold_process)
    resources = {"num_cpus": cpus_per_fold, "num_gpus": gpus_per_fold, "max_retries": max_retries,
                 "retry_exceptions": [subprocess.CalledProcessError]}  # killed: retried; other exits: final
    started = time.time()
    pending: dict = {}
    for v, f, own in specs:
        paths = FoldPaths(Path(assets), v, f)
        argv = fold_argv(v, f, n_folds, data, assets, tts_dir, list(own), list(extra or []), threads)
        ref = task.options(name=f"fold {paths.stem}", **resources).remote(
            argv, str(ROOT), forwarded_env(threads), str(paths.stdout_log),
            str(Path(assets) / RAY_DIR / f"{paths.stem}.attempt.json"), str(paths.last), str(token_file), token)
        pending[ref] = paths
    print(f"{len(pending)} folds submitted to Ray ({cpus_per_fold:g} CPU, {gpus_per_fold:g} GPU each; "
          f"cluster: {_describe(ray)})")
    return _collect(ray, pending, started, max_retries, progress, poll)


def _collect(ray, pending: dict, started: float, max_retries: int, progress: bool, poll: float) -> dict[str, int]:
    """Wait for the fold tasks, reporting each as it ends, with the running folds on the bar."""
    results: dict[str, int] = {}
    bar = tqdm(total=len(pending), desc="folds (ray)", unit="fold", disable=not progress, dynamic_ncols=True)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=poll)
            for ref in ready:
                paths = pending.pop(ref)
                results[paths.stem] = _report(ray, ref, paths, started, max_retries)
                bar.update(1)
            bar.set_postfix_str(" | ".join(s for s in (_status(p, started) for p in pending.values()) if s))
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
    return results


def _report(ray, ref, paths: FoldPaths, started: float, max_retries: int) -> int:
    """One ended fold task: print its outcome (a failure with the tail of its log); its exit code."""
    try:
        out = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        code = cause.returncode if isinstance(cause, subprocess.CalledProcessError) else -1
        why = f"killed (exit {code}) on each of its {max_retries + 1} attempts" if code != -1 else \
            f"task error: {str(exc).strip().splitlines()[-1][:300]}"
        out = {"code": code, "node": "?", "seconds": time.time() - started, "error": why}
    except ray.exceptions.RayError as exc:  # the worker or node died more often than retried, cancelled
        out = {"code": -1, "node": "?", "seconds": time.time() - started,
               "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"}
    code = out["code"]
    if code == 0:
        tqdm.write(f"{paths.stem}: done in {out['seconds']:.0f}s on {out['node']}, "
                   f"valid log loss {_summary_loss(paths)}")
    else:
        tail = out.get("tail") or _tail_of(str(paths.stdout_log))
        reason = f" ({out['error']})" if out.get("error") else ""
        tqdm.write(f"{paths.stem}: FAILED (exit {code}) after {out['seconds']:.0f}s on {out['node']}{reason}; "
                   f"log: {paths.stdout_log}\n{tail}")
    return code


def _describe(ray) -> str:
    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return f"{nodes} node{'s' if nodes != 1 else ''}, {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"


def _summary_loss(paths: FoldPaths) -> str:
    try:
        return f"{json.loads(paths.summary.read_text())['valid_logloss']:.4f}"
    except Exception:  # noqa: BLE001 (a display detail: the fold's files are checked elsewhere)
        return "?"


def _status(paths: FoldPaths, started: float) -> str:
    """A running fold's epoch and validation loss, from the progress file it writes this run."""
    try:
        if paths.progress.stat().st_mtime < started:
            return ""
        p = json.loads(paths.progress.read_text())
        return f"{paths.stem} ep {p['epoch']}/{p['epochs']} val {p['valid_logloss']:.3f}"
    except Exception:  # noqa: BLE001 (not started yet, or a file being replaced)
        return ""
