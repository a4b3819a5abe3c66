"""How the runner starts a fold's script: forked from a fork server, or a fresh interpreter.

Importing torch and transformers takes a fresh Python about 8 s, paid by every fold. On CPU
the jobs are therefore forked from a fork server that has imported them once
(multiprocessing's "forkserver": the server is single-threaded and never runs torch, so its
children start clean); each child runs the script exactly as `python train_model<v>.py` would
(same argv, cwd, environment, output, exit code). With CUDA, or READALOUD_LAUNCH=exec, every
job is a fresh `python train_model<v>.py` instead. Only runner.py uses this module.
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
from multiprocessing import forkserver
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

LAUNCH_ENV = "READALOUD_LAUNCH"  # "fork" | "exec"; default: fork on CPU, exec with CUDA
# What every fold would import anyway; the fork server imports it once.
_PRELOAD = ["readaloud.pipeline.fold_run", "sklearn.ensemble"]
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


def launch(argv: list[str], log: Path, env: dict[str, str], mode: str):
    """Start `argv` (python, script, args) by `mode` ("fork" | "exec"), output to `log`; a
    Popen-like object (poll, terminate)."""
    if mode == "fork":
        return ForkedScript(argv, log, env)
    with open(log, "ab") as out:  # the child keeps its own handle
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
