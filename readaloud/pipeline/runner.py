"""Run (variant, fold) training jobs in parallel processes with one progress display.

Each job is `train_model<v>.py --fold F ...` in its own process, so a crash or a kill costs one
fold, not the batch; its output goes to assets/runs/<v>_<f>/stdout.log. On CPU the cores are
split between the jobs once, when they start (torch threads per job, fixed for the job's
whole run: a thread count that changed with the timing of other jobs would change the
numbers); with --gpus each job gets one GPU. How a job is started (forked from a fork server
or a fresh interpreter) is launch.py's business.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..config import RunConfig
from ..layout import FoldPaths, fold_script, unfinished_folds
from ..members.registry import member_for
from ..prep.prepare import prepare_training_data
from .launch import ROOT, launch, launch_mode


@dataclass
class Job:
    variant: str
    fold: int
    args: list[str]
    paths: FoldPaths
    proc: object = None         # what launch.launch started: poll(), terminate()
    started: float = 0.0
    env: dict = field(default_factory=dict)


def script_for(variant: str) -> Path:
    return ROOT / fold_script(variant)


def prepare_for_jobs(data: str | Path, tts_dir: str | Path, n_folds: int, cfgs: list[RunConfig],
                     progress: bool = True) -> None:
    """Everything the jobs read, made once before they start: references, clip features, the
    fold file, and whatever each member family's folds share (gbm: the alignment features)."""
    inputs = prepare_training_data(data, tts_dir, n_folds, {c.tts for c in cfgs}, {c.model.n_mels for c in cfgs},
                                   progress=progress)
    by_family: dict[str, list[RunConfig]] = {}
    for c in cfgs:
        by_family.setdefault(c.model.arch, []).append(c)
    for family_cfgs in by_family.values():
        member_for(family_cfgs[0]).prepare_shared(inputs, family_cfgs, Path(data), progress)


def run_jobs(variants: list[str], folds: list[int], data: str, assets: str, tts_dir: str,
             jobs: int = 2, extra: list[str] | None = None, force: bool = False, gpus: list[str] | None = None,
             progress: bool = True, poll: float = 2.0) -> dict[str, int]:
    """Train every (variant, fold) not finished yet, `jobs` at a time. Returns {stem: exit code}."""
    specs, results = fold_specs(variants, folds, assets, force)
    return results | run_fold_jobs(specs, data, assets, tts_dir, jobs, extra, gpus, progress, poll)


def fold_specs(variants: list[str], folds: list[int], assets: str, force: bool = False
               ) -> tuple[list[tuple[str, int, list[str]]], dict[str, int]]:
    """The (variant, fold, options) to train, and {stem: 0} of the folds finished already (each
    announced as skipped)."""
    todo = unfinished_folds(variants, folds, assets, force)
    results = {}
    for v, f in [(v, f) for v in variants for f in folds if (v, f) not in todo]:
        stem = FoldPaths(Path(assets), v, f).stem
        print(f"{stem}: finished already, skipped (--force to retrain)")
        results[stem] = 0
    return [(v, f, ["--force"] if force else []) for v, f in todo], results


def run_fold_jobs(specs: list[tuple[str, int, list[str]]], data: str, assets: str, tts_dir: str,
                  jobs: int = 2, extra: list[str] | None = None, gpus: list[str] | None = None,
                  progress: bool = True, poll: float = 2.0) -> dict[str, int]:
    """Run train_model<variant>.py for each (variant, fold, its own options), `jobs` at a time;
    `extra` options go to every job. Returns {stem: exit code}."""
    extra = list(extra or [])
    queue: list[Job] = []
    for v, f, own in specs:
        # absolute: a fold job starts in the repository, wherever train.py was started from
        args = [sys.executable, str(script_for(v)), "--fold", str(f), "--data", str(Path(data).resolve()),
                "--assets", str(Path(assets).resolve()), "--tts_dir", str(Path(tts_dir).resolve()),
                "--no_progress", "--quiet"]
        queue.append(Job(v, f, args + list(own) + extra, FoldPaths(Path(assets), v, f)))
    if not queue:
        return {}
    cores = os.cpu_count() or 1
    # from --jobs alone, not from how many folds are left: a rerun that finds one fold left (or
    # resumes one) must train it at the thread count a full run gave it, or its bits differ
    threads = max(1, cores // max(1, jobs))
    mode = launch_mode(gpus)
    results: dict[str, int] = {}
    running: list[Job] = []
    gpu_free = list(gpus or [])
    bar = tqdm(total=len(queue), desc="folds", unit="fold", disable=not progress, dynamic_ncols=True)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                job = queue.pop(0)
                mode = _start(job, threads, gpu_free, mode)
                running.append(job)
            time.sleep(poll)
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                if "gpu" in job.env:
                    gpu_free.append(job.env["gpu"])
                results[job.paths.stem] = _report(job)
                bar.update(1)
            bar.set_postfix_str(" | ".join(_status(j) for j in running))
    except KeyboardInterrupt:
        for job in running:
            job.proc.terminate()
        raise
    finally:
        bar.close()
    return results


def _start(job: Job, threads: int, gpu_free: list[str], mode: str) -> str:
    """Start one job with its share of the cores (or its GPU); returns the launch mode for the
    next ones ("exec" from now on if the fork server could not fork)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    job.args += ["--threads", str(threads)] if "--threads" not in job.args else []
    job.paths.run_dir.mkdir(parents=True, exist_ok=True)
    if gpu_free:
        job.env["gpu"] = gpu_free.pop(0)
        env["CUDA_VISIBLE_DEVICES"] = job.env["gpu"]
    try:
        job.proc = launch(job.args, job.paths.stdout_log, env, mode)
    except (OSError, EOFError, RuntimeError) as exc:  # the fork server died (e.g. killed for memory)
        if mode != "fork":
            raise
        tqdm.write(f"{job.paths.stem}: could not fork from the fork server ({exc!r}); "
                   f"starting this and the remaining folds in fresh interpreters")
        mode = "exec"
        job.proc = launch(job.args, job.paths.stdout_log, env, mode)
    job.started = time.time()
    return mode


def _report(job: Job) -> int:
    code = job.proc.poll()
    took = time.time() - job.started
    if code == 0:
        tqdm.write(f"{job.paths.stem}: done in {took:.0f}s, valid log loss {_summary_loss(job.paths)}")
    else:
        tqdm.write(f"{job.paths.stem}: FAILED (exit {code}) after {took:.0f}s; log: {job.paths.stdout_log}\n"
                   f"{_tail(job.paths.stdout_log)}")
    return code


def _summary_loss(paths: FoldPaths) -> str:
    try:
        return f"{json.loads(paths.summary.read_text())['valid_logloss']:.4f}"
    except Exception:
        return "?"


def _status(job: Job) -> str:
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
