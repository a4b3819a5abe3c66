"""Run (variant, fold) training jobs in parallel processes with one progress display.

Each job is `train_model<v>.py --fold F ...` in its own process, so a crash or a kill costs one
fold, not the batch; its output goes to assets/runs/<v>_<f>/stdout.log. On CPU the cores are
split between the jobs (torch threads per job), and once nothing is left to start, the cores of
finished jobs go to the ones still running (readaloud.cpu); with --gpus each job gets one GPU.

Launching: importing torch and transformers takes a fresh Python about 8 s, paid by every fold.
On CPU the jobs are therefore forked from a fork server that has imported them once
(multiprocessing's "forkserver": the server is single-threaded and never runs torch, so its
children start clean); each child runs the script exactly as `python train_model<v>.py` would.
With CUDA, or READALOUD_LAUNCH=exec, every job is a fresh `python train_model<v>.py` instead.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .cpu import THREADS_FILE_ENV, write_budget
from .training import FoldPaths

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Job:
    variant: str
    fold: int
    args: list[str]
    paths: FoldPaths
    proc: subprocess.Popen | "ForkedScript" | None = None
    started: float = 0.0
    returncode: int | None = None
    env: dict = field(default_factory=dict)
    threads: int = 1


def script_for(variant: str) -> Path:
    return ROOT / f"train_model{variant.removeprefix('model')}.py"


LAUNCH_ENV = "READALOUD_LAUNCH"  # "fork" | "exec"; default: fork on CPU, exec with CUDA
# What every fold would import anyway; the fork server imports it once.
_PRELOAD = ["readaloud.cli", "readaloud.training", "readaloud.gbm", "readaloud.plots", "sklearn.ensemble"]
_fork_context = None


def launch_mode(gpus: list[str] | None) -> str:
    """How jobs are started: "fork" (from the fork server) or "exec" (a fresh interpreter)."""
    chosen = os.environ.get(LAUNCH_ENV, "").strip().lower()
    if chosen in ("fork", "exec"):
        return chosen
    if chosen:
        raise ValueError(f"${LAUNCH_ENV}={chosen!r}: expected 'fork' or 'exec'")
    if gpus or "forkserver" not in multiprocessing.get_all_start_methods():
        return "exec"
    import torch
    return "exec" if torch.cuda.is_available() else "fork"  # CUDA and forking do not mix


def _forkserver():
    global _fork_context
    if _fork_context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        _fork_context = ctx
    return _fork_context


def start_launcher(gpus: list[str] | None = None) -> None:
    """Start the fork server in the background (it takes as long as one fold's imports), so that
    it is ready when the first job starts; a no-op when jobs are exec'd."""
    if launch_mode(gpus) != "fork":
        return
    import threading
    from multiprocessing import forkserver
    _forkserver()
    threading.Thread(target=forkserver.ensure_running, daemon=True, name="forkserver-start").start()


class ForkedScript:
    """A script run in a child of the fork server, with a Popen-like poll() and terminate()."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]):
        self.process = _forkserver().Process(target=_run_script, args=(argv, str(log), env), daemon=False)
        self.process.start()

    def poll(self) -> int | None:
        return self.process.exitcode

    def terminate(self) -> None:
        self.process.terminate()


def _run_script(argv: list[str], log: str, env: dict[str, str]) -> None:
    """In the forked child: what `python <argv>` with environment `env`, stdout and stderr to `log`, does."""
    import atexit
    import runpy
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    if env.get("OMP_NUM_THREADS"):  # BLAS read it once, in the server: apply it here, as a fresh process would
        try:
            from threadpoolctl import threadpool_limits
            threadpool_limits(limits=int(env["OMP_NUM_THREADS"]), user_api="blas")
        except Exception:  # noqa: BLE001 (threadpoolctl missing or a BLAS it cannot drive: not worth a fold)
            pass
    os.chdir(ROOT)
    sys.argv = argv[1:]
    try:
        runpy.run_path(argv[1], run_name="__main__")
    finally:
        atexit._run_exitfuncs()  # what interpreter exit does; forked children skip it


def run_jobs(variants: list[str], folds: list[int], n_folds: int, data: str, assets: str, tts_dir: str,
             jobs: int = 2, extra: list[str] | None = None, force: bool = False, gpus: list[str] | None = None,
             epochs: int | None = None, progress: bool = True, poll: float = 2.0) -> dict[str, int]:
    """Train every (variant, fold) not finished yet, `jobs` at a time. Returns {stem: exit code}."""
    todo = unfinished(variants, folds, assets, force)
    results = {}
    for v, f in [(v, f) for v in variants for f in folds if (v, f) not in todo]:
        stem = FoldPaths(Path(assets), v, f).stem
        print(f"{stem}: finished already, skipped (--force to retrain)")
        results[stem] = 0
    specs = [(v, f, ["--force"] if force else []) for v, f in todo]
    return results | run_fold_jobs(specs, n_folds, data, assets, tts_dir, jobs, extra, gpus, epochs, progress, poll)


def unfinished(variants: list[str], folds: list[int], assets: str, force: bool = False) -> list[tuple[str, int]]:
    """The (variant, fold) pairs run_jobs would train: all with `force`, else those not finished."""
    return [(v, f) for v in variants for f in folds if force or not FoldPaths(Path(assets), v, f).finished()]


def run_fold_jobs(specs: list[tuple[str, int, list[str]]], n_folds: int, data: str, assets: str, tts_dir: str,
                  jobs: int = 2, extra: list[str] | None = None, gpus: list[str] | None = None,
                  epochs: int | None = None, progress: bool = True, poll: float = 2.0) -> dict[str, int]:
    """Run train_model<variant>.py for each (variant, fold, its own options), `jobs` at a time;
    `extra` options go to every job. Returns {stem: exit code}."""
    extra = list(extra or [])
    results: dict[str, int] = {}
    todo: list[Job] = []
    for v, f, own in specs:
        args = [sys.executable, str(script_for(v)), "--fold", str(f), "--n_folds", str(n_folds),
                "--data", str(data), "--assets", str(assets), "--tts_dir", str(tts_dir), "--no_progress", "--quiet"]
        todo.append(Job(v, f, args + list(own) + extra, FoldPaths(Path(assets), v, f)))
    if not todo:
        return results
    cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, min(jobs, len(todo)))) if not gpus else max(1, cores // jobs)
    fixed_threads = bool(gpus) or any(a == "--threads" for a in extra)  # the user's choice stays
    total_epochs = epochs or 0
    launch = launch_mode(gpus)
    bar = tqdm(total=len(todo), desc="folds", unit="fold", disable=not progress, dynamic_ncols=True)
    running: list[Job] = []
    queue = list(todo)
    gpu_free = list(gpus or [])
    try:
        while queue or running:
            while queue and len(running) < jobs:
                job = queue.pop(0)
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
                job.args += ["--threads", str(threads)] if "--threads" not in job.args else []
                job.paths.run_dir.mkdir(parents=True, exist_ok=True)
                job.threads = threads
                if not fixed_threads:
                    write_budget(job.paths.thread_budget, threads)
                    env[THREADS_FILE_ENV] = str(job.paths.thread_budget)
                if gpus:
                    job.env["gpu"] = gpu_free.pop(0)
                    env["CUDA_VISIBLE_DEVICES"] = job.env["gpu"]
                if launch == "fork":
                    try:
                        job.proc = ForkedScript(job.args, job.paths.stdout_log, env)
                    except (OSError, EOFError, RuntimeError) as exc:  # the fork server died (e.g. killed for memory)
                        tqdm.write(f"{job.paths.stem}: could not fork from the fork server ({exc!r}); "
                                   f"starting this and the remaining folds in fresh interpreters")
                        launch = "exec"
                if launch == "exec":
                    with open(job.paths.stdout_log, "ab") as log:  # the child keeps its own handle
                        job.proc = subprocess.Popen(job.args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                job.started = time.time()
                running.append(job)
            time.sleep(poll)
            for job in list(running):
                code = job.proc.poll()
                if code is None:
                    continue
                running.remove(job)
                if "gpu" in job.env:
                    gpu_free.append(job.env["gpu"])
                results[job.paths.stem] = code
                bar.update(1)
                took = time.time() - job.started
                if code == 0:
                    loss = _summary_loss(job.paths)
                    tqdm.write(f"{job.paths.stem}: done in {took:.0f}s, valid log loss {loss}")
                else:
                    tail = _tail(job.paths.stdout_log)
                    tqdm.write(f"{job.paths.stem}: FAILED (exit {code}) after {took:.0f}s; "
                               f"log: {job.paths.stdout_log}\n{tail}")
            if not queue and running and not fixed_threads:
                _share_free_cores(running, cores)
            bar.set_postfix_str(" | ".join(_status(j, total_epochs) for j in running))
    except KeyboardInterrupt:
        for job in running:
            job.proc.terminate()
        raise
    finally:
        bar.close()
    return results


def _share_free_cores(running: list[Job], cores: int) -> None:
    """Nothing left to start: split all cores between the jobs still running."""
    base, extra = divmod(cores, len(running))
    for i, job in enumerate(sorted(running, key=lambda j: j.started)):
        share = max(1, base + (1 if i < extra else 0))
        if share > job.threads:
            try:
                write_budget(job.paths.thread_budget, share)
            except OSError:
                continue
            tqdm.write(f"{job.paths.stem}: a job ended, now {share} threads")
            job.threads = share


def _summary_loss(paths: FoldPaths) -> str:
    try:
        return f"{json.loads(paths.summary.read_text())['valid_logloss']:.4f}"
    except Exception:
        return "?"


def _status(job: Job, epochs: int) -> str:
    try:
        p = json.loads(job.paths.progress.read_text())
        return f"{job.paths.stem} ep {p['epoch']}/{p['epochs']} val {p['valid_logloss']:.3f}"
    except Exception:
        return f"{job.paths.stem} starting"


def _tail(path: Path, n: int = 12) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
        return "\n".join("    " + line for line in lines[-n:])
    except OSError:
        return ""
