"""Run the folds, and inference, on a Ray cluster: `train.py --ray`, `check_models.py --retrain --ray`,
`infer.py --ray`.

Why Ray: a competition run is 10 variants x 6 folds of Whisper small/medium, tens of GPU-hours.
The folds are independent, so an existing scheduler places them on the machines of a cluster
(CPUs and GPUs per fold, fractions allowed: two small folds can share a GPU), retries a fold
whose worker or node dies and reports the others, instead of a launcher of our own.

A fold task runs exactly the command train.py's runner runs for that fold,
`python train_model<v>.py --fold K --data ... --assets ... <overrides>`, as a
subprocess in the repo root of its node, output appended to assets/runs/<v>_<K>/stdout.log.
The fold script resumes from its last checkpoint (bit-identically), so a retried fold goes on
where the dead one stopped; a retry drops --force/--restart/--resume once the first attempt
has written a checkpoint of its own, else the retry would throw that work away.

A cluster needs the repo and its venv, the data, the TTS cache and the assets folder at the same
absolute paths on every node (shared storage such as NFS; a local cluster shares them
trivially). Each task first reads a token the driver wrote into assets/.ray/ and refuses to
start a fold that could not write where the driver reads.

`infer.py --ray` splits the submission's rows into contiguous shards, runs `infer.py --rows <shard>`
for each the same way and merges the shards' files into one submission in the format's order.
Run preprocess.py first: the shards then only read the feature and reference caches.

The task functions are shipped to the workers by value and use only the standard library, so
a worker neither imports torch nor needs the package on its path: the fold script does that.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .checkpoints import atomic_csv, atomic_write
from .data import load_submission_format
from .layout import FoldPaths
from .metrics import log_loss
from .pipeline.inference import write_fallback_submission
from .pipeline.runner import _summary_loss, fold_specs, script_for

ROOT = Path(__file__).resolve().parent.parent
RAY_PIN = "ray[default]==2.60.0"
RAY_DIR = ".ray"                 # under assets: the driver's token and each fold's attempt record
KILLED_EXIT_CODES = (137, 143)   # SIGKILL / SIGTERM as a shell or a container reports them
# the driver's settings a fold needs wherever it runs: ours, the offline hub, tqdm, and the kernel
# pins that keep a fold's bits the same on other x86 processors (make demo sets them)
FORWARDED_ENV_PREFIXES = ("READALOUD_", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_VERBOSITY",
                          "TQDM_DISABLE", "WANDB_MODE", "ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
ONE_SHOT_FLAGS = ("--force", "--restart")  # a retry that resumes must not repeat them (nor --resume PATH)
LOCAL_OBJECT_STORE = 256 * 1024 ** 2       # the tasks pass file names and small tables, never weights
MAX_RETRIES = 3


class RayJobError(RuntimeError):
    """The cluster cannot run the request (Ray missing, no node fits a fold, assets not shared)."""


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise RayJobError(f"--ray needs Ray: pip install \"{RAY_PIN}\" ({exc})") from exc
    return ray


def connect(address: str | None, local_cpus: int | None = None):
    """Join the cluster at `address` ('auto': the running one) or start a local one ('local' or
    None: `local_cpus` CPUs, default all, no dashboard; Ray 2.60 guards a local cluster with a
    token it generates in ~/.ray/auth_token). Returns the ray module."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address in (None, "", "local"):
        ray.init(address="local", num_cpus=local_cpus or os.cpu_count() or 1, include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE)
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
    folder = assets / RAY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    atomic_write(folder / "driver", token)
    return folder / "driver", token


def fold_argv(variant: str, fold: int, data: str, assets: str, tts_dir: str, own: list[str], extra: list[str],
              threads: int) -> list[str]:
    """The fold's command after the interpreter, as train.py's runner builds it."""
    argv = [str(script_for(variant)), "--fold", str(fold), "--data", str(data), "--assets", str(assets),
            "--tts_dir", str(tts_dir), "--no_progress", "--quiet", *own, *extra]
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


def run_script_attempt(argv: list[str], cwd: str, env: dict, log: str, record: str, last: str,
                       token_file: str, token: str) -> dict:
    """One attempt at one task (a fold, a shard of inference) on a Ray worker: `python <argv>` in
    `cwd`, output appended to `log`. Raises CalledProcessError when the process was killed (Ray
    retries it); returns its exit code otherwise, with the tail of its log. `last`: the file a
    retry resumes from (a fold's last.pth; '' for none)."""
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
    except BaseException:  # cancelled: the process goes with the task
        proc.kill()
        raise
    if code < 0 or code in KILLED_EXIT_CODES:
        with open(log, "ab") as out:
            out.write(f"[ray] the process was killed (exit {code}): Ray retries it\n".encode())
        raise subprocess.CalledProcessError(code, argv)
    return {"code": code, "node": host, "seconds": time.time() - start, "tail": _tail_of(log) if code else ""}


# ---- driver side -------------------------------------------------------------------------------

@dataclass
class Submitted:
    """A task the driver waits for: its name, log, and for a fold its files (progress, summary)."""
    name: str
    log: Path
    fold: FoldPaths | None = None


class Cluster:
    """The driver's handle: the connection, the token every task checks, the task function."""

    def __init__(self, address: str | None, assets: Path, cpus: float, gpus: float, unit: str):
        self.ray = connect(address)
        check_fits(self.ray, cpus, gpus, unit)
        self.token_file, self.token = write_driver_token(assets)
        self.ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import us
        self.task = self.ray.remote(run_script_attempt)
        self.resources = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": MAX_RETRIES,
                          "retry_exceptions": [subprocess.CalledProcessError]}  # killed: retried; other exits: final
        self.started = time.time()

    def submit(self, name: str, argv: list[str], env: dict, log: Path, record: Path, last: str = ""):
        return self.task.options(name=name, **self.resources).remote(
            argv, str(ROOT), env, str(log), str(record), last, str(self.token_file), self.token)

    def describe(self) -> str:
        res = self.ray.cluster_resources()
        nodes = sum(1 for n in self.ray.nodes() if n.get("Alive"))
        return f"{nodes} node{'s' if nodes != 1 else ''}, {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"


def run_jobs_on_ray(variants: list[str], folds: list[int], data: str, assets: str, tts_dir: str,
                    extra: list[str] | None = None, force: bool = False, address: str | None = None,
                    cpus_per_fold: float = 1.0, gpus_per_fold: float = 0.0, progress: bool = True,
                    poll: float = 2.0) -> dict[str, int]:
    """train.py --ray: every (variant, fold) not finished yet as a Ray task. Returns {stem: exit code}."""
    specs, results = fold_specs(variants, folds, assets, force)
    return results | run_fold_jobs_on_ray(specs, data, assets, tts_dir, extra, address, cpus_per_fold, gpus_per_fold,
                                          progress, poll)


def run_fold_jobs_on_ray(specs: list[tuple[str, int, list[str]]], data: str, assets: str, tts_dir: str,
                         extra: list[str] | None = None, address: str | None = None,
                         cpus_per_fold: float = 1.0, gpus_per_fold: float = 0.0, progress: bool = True,
                         poll: float = 2.0) -> dict[str, int]:
    """Each (variant, fold, its own options) as a Ray task with the resources asked for; `extra`
    options go to every fold. Returns {stem: exit code} (-1: no exit code, e.g. the node died)."""
    if not specs:
        return {}
    data, assets, tts_dir = (str(Path(p).resolve()) for p in (data, assets, tts_dir))
    cluster = Cluster(address, Path(assets), cpus_per_fold, gpus_per_fold, "fold")
    threads = max(1, int(cpus_per_fold))
    pending: dict = {}
    for v, f, own in specs:
        paths = FoldPaths(Path(assets), v, f)
        argv = fold_argv(v, f, data, assets, tts_dir, list(own), list(extra or []), threads)
        ref = cluster.submit(f"fold {paths.stem}", argv, forwarded_env(threads), paths.stdout_log,
                             Path(assets) / RAY_DIR / f"{paths.stem}.attempt.json", str(paths.last))
        pending[ref] = Submitted(paths.stem, paths.stdout_log, paths)
    print(f"{len(pending)} folds submitted to Ray ({cpus_per_fold:g} CPU, {gpus_per_fold:g} GPU each; "
          f"cluster: {cluster.describe()})")
    return {name: out["code"] for name, out in _collect(cluster, pending, "folds", progress, poll).items()}


def _collect(cluster: Cluster, pending: dict, unit: str, progress: bool, poll: float) -> dict[str, dict]:
    """Wait for the tasks, reporting each as it ends, with the running folds on the progress bar.
    Returns {name: the attempt's outcome}."""
    ray, results = cluster.ray, {}
    bar = tqdm(total=len(pending), desc=f"{unit} (ray)", unit=unit.rstrip("s"), disable=not progress,
               dynamic_ncols=True)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=poll)
            for ref in ready:
                job = pending.pop(ref)
                results[job.name] = _report(cluster, ref, job)
                bar.update(1)
            bar.set_postfix_str(" | ".join(s for s in (_status(j, cluster.started) for j in pending.values()) if s))
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
    return results


def _report(cluster: Cluster, ref, job: Submitted) -> dict:
    """One ended task: print its outcome (a failure with the tail of its log); the outcome."""
    ray = cluster.ray
    try:
        out = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        code = cause.returncode if isinstance(cause, subprocess.CalledProcessError) else -1
        why = f"killed (exit {code}) on each of its {MAX_RETRIES + 1} attempts" if code != -1 else \
            f"task error: {str(exc).strip().splitlines()[-1][:300]}"
        out = {"code": code, "node": "?", "seconds": time.time() - cluster.started, "error": why}
    except ray.exceptions.RayError as exc:  # the worker or node died more often than retried, cancelled
        out = {"code": -1, "node": "?", "seconds": time.time() - cluster.started,
               "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"}
    if out["code"] == 0:
        loss = f", valid log loss {_summary_loss(job.fold)}" if job.fold else ""
        tqdm.write(f"{job.name}: done in {out['seconds']:.0f}s on {out['node']}{loss}")
    else:
        tail = out.get("tail") or _tail_of(str(job.log))
        reason = f" ({out['error']})" if out.get("error") else ""
        tqdm.write(f"{job.name}: FAILED (exit {out['code']}) after {out['seconds']:.0f}s on {out['node']}{reason}; "
                   f"log: {job.log}\n{tail}")
    return out


def _status(job: Submitted, started: float) -> str:
    """A running fold's epoch and validation loss, from the progress file it writes this run."""
    if job.fold is None:
        return ""
    try:
        if job.fold.progress.stat().st_mtime < started:
            return ""
        p = json.loads(job.fold.progress.read_text())
        return f"{job.name} ep {p['epoch']}/{p['epochs']} val {p['valid_logloss']:.3f}"
    except Exception:  # noqa: BLE001 (not started yet, or a file being replaced)
        return ""


# ---- inference fan-out -------------------------------------------------------------------------

def read_rows(path: str | Path) -> list[str]:
    """The filenames of an `infer.py --rows` file (a CSV with a filename column)."""
    rows = pd.read_csv(path)
    if "filename" not in rows.columns:
        raise ValueError(f"{path}: no 'filename' column (columns: {list(rows.columns)})")
    return rows["filename"].astype(str).tolist()


def shard_count(cluster: Cluster, n_rows: int, shards: int | None, cpus: float, gpus: float) -> int:
    """As many shards as the cluster runs at once (CPUs, and GPUs when asked for), at most one per row."""
    if shards:
        return max(1, min(shards, n_rows))
    res = cluster.ray.cluster_resources()
    fit = int(res.get("CPU", 1) // cpus)
    if gpus > 0:
        fit = min(fit, int(res.get("GPU", 0) // gpus))
    return max(1, min(fit, n_rows))


def run_inference_on_ray(data: str, assets: str, tts_dir: str, out: str, device: str = "auto",
                         time_limit: float | None = None, address: str | None = None, shards: int | None = None,
                         cpus_per_shard: float = 1.0, gpus_per_shard: float = 0.0, progress: bool = True,
                         poll: float = 2.0) -> dict:
    """infer.py --ray: the submission's rows in contiguous shards, each predicted by `infer.py --rows`
    as a Ray task, merged into one `out` with the submission format's rows and order. A shard that
    fails for good leaves its rows to the task priors (as infer.py does) and sets "error"."""
    start = time.time()
    data, assets, tts_dir = (str(Path(p).resolve()) for p in (data, assets, tts_dir))
    fmt = load_submission_format(data)
    cluster = Cluster(address, Path(assets), cpus_per_shard, gpus_per_shard, "shard")
    n = shard_count(cluster, len(fmt), shards, cpus_per_shard, gpus_per_shard)
    folder = Path(assets) / RAY_DIR / f"infer-{cluster.token[:8]}"
    folder.mkdir(parents=True, exist_ok=True)
    env = forwarded_env(max(1, int(cpus_per_shard)))
    pending, parts = {}, {}
    for k, idx in enumerate(np.array_split(np.arange(len(fmt)), n)):
        name, rows = f"shard {k + 1}/{n}", folder / f"rows_{k}.csv"
        atomic_csv(fmt.iloc[idx][["filename"]], rows)
        argv = [str(ROOT / "infer.py"), "--data", data, "--assets", assets, "--tts_dir", tts_dir, "--rows", str(rows),
                "--out", str(folder / f"shard_{k}.csv"), "--device", device, "--no_progress"]
        argv += ["--time_limit", str(time_limit)] if time_limit else []
        pending[cluster.submit(name, argv, env, folder / f"shard_{k}.log", folder / f"shard_{k}.attempt.json")] = \
            Submitted(name, folder / f"shard_{k}.log")
        parts[name] = (folder / f"shard_{k}.csv", fmt["filename"].iloc[idx].tolist())
    print(f"{len(fmt)} rows in {n} shards submitted to Ray ({cpus_per_shard:g} CPU, {gpus_per_shard:g} GPU each; "
          f"cluster: {cluster.describe()})")
    outcomes = _collect(cluster, pending, "shards", progress, poll)
    result = merge_shards(fmt, parts, outcomes, data, assets, out, folder)
    result["seconds"] = time.time() - start
    if "error" not in result:
        shutil.rmtree(folder, ignore_errors=True)  # kept on failure: the shards' logs
    return result


def merge_shards(fmt: pd.DataFrame, parts: dict, outcomes: dict, data: str, assets: str, out: str,
                 folder: Path) -> dict:
    """One submission from the shards' files, in the format's order; a shard without a usable file
    gets the task priors of infer.py's own fallback. The result infer.py prints."""
    scores, results, failed, fallback = [], [], [], None
    for name, (path, rows) in parts.items():
        shard = _shard_scores(path, rows)
        if shard is None:
            if fallback is None:
                write_fallback_submission(data, assets, folder / "fallback.csv")
                fallback = pd.read_csv(folder / "fallback.csv").set_index("filename")["score"]
            shard = fallback.loc[rows]
            failed.append(f"{name} (exit {outcomes.get(name, {}).get('code')})")
        else:
            results.append((rows, json.loads(Path(f"{path}.json").read_text())))
        scores.append(shard)
    merged = pd.concat(scores)
    sub = pd.DataFrame({"filename": fmt["filename"], "score": merged.loc[fmt["filename"]].to_numpy()})
    atomic_csv(sub, out)
    result = _merged_result(sub, results, data)
    result["submission"], result["shards"] = str(out), len(parts)
    for name, (_, rows) in parts.items():
        if any(f.startswith(name + " ") for f in failed):
            result["fallback_rows"] += len(rows)
            result["fallback"].update({f: f"{name} of infer.py --ray failed" for f in rows})
    if failed:
        result["error"] = f"shard(s) {', '.join(failed)} failed: their rows hold task priors; logs in {folder}"
    return result


def _shard_scores(path: Path, rows: list[str]) -> pd.Series | None:
    """A shard's scores by filename, or None when its file is missing or not exactly its rows."""
    try:
        shard = pd.read_csv(path)
    except (OSError, ValueError):
        return None
    if shard["filename"].astype(str).tolist() != rows or not Path(f"{path}.json").exists():
        return None
    return shard.set_index("filename")["score"]


def _merged_result(sub: pd.DataFrame, results: list[tuple[list[str], dict]], data: str) -> dict:
    """infer.py's result keys over all shards; test log losses are the shards' means weighted by
    their labelled rows (the merged ensemble's is computed from the merged submission)."""
    used = [r["checkpoints_used"] for _, r in results]
    out = {"rows": len(sub), "checkpoints_used": min(used) if used else 0,
           "checkpoints_listed": max((r["checkpoints_listed"] for _, r in results), default=0),
           "models_used": sorted(set().union(*(r["models_used"] for _, r in results))) if results else [],
           "fallback_rows": sum(r["fallback_rows"] for _, r in results),
           "fallback": {f: why for _, r in results for f, why in r.get("fallback", {}).items()}}
    labels_path = Path(data) / "test_labels.csv"
    if not labels_path.exists() or not results or any("test_logloss" not in r for _, r in results):
        return out
    labels = pd.read_csv(labels_path).set_index("filename")["score"]
    labelled = sub[sub["filename"].isin(labels.index)]
    y = labels.loc[labelled["filename"]].to_numpy(dtype=float)
    ok = np.isfinite(y)
    out["test_logloss"] = log_loss(y[ok], labelled["score"].to_numpy()[ok])
    counts = [int(np.isfinite(labels.reindex(rows).to_numpy(dtype=float)).sum()) for rows, _ in results]

    def weighted(values):  # shards without a labelled row have no log loss to weigh
        pairs = [(v, c) for v, c in zip(values, counts) if c]
        return float(sum(v * c for v, c in pairs) / sum(c for _, c in pairs)) if pairs else float("nan")
    out["test_logloss_prior"] = weighted([r["test_logloss_prior"] for _, r in results])
    models = set.intersection(*(set(r["test_logloss_single"]) for _, r in results))
    out["test_logloss_single"] = {m: weighted([r["test_logloss_single"][m] for _, r in results]) for m in models}
    return out
