"""CPU thread budget of a training job, which train.py can raise while the job runs.

train.py splits the cores between its parallel jobs. When the queue is empty and a job ends,
its cores would idle while the others finish; instead the runner writes a larger thread count
into each remaining job's budget file, and the job picks it up between batches. Without the
file (a fold run by hand) the budget is simply the --threads it started with.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from .checkpoints import atomic_write

log = logging.getLogger("readaloud")

THREADS_FILE_ENV = "READALOUD_THREADS_FILE"


def write_budget(path: Path, threads: int) -> None:
    """Atomically replace the budget file, so a job never reads half a number."""
    atomic_write(path, str(int(threads)))


class ThreadBudget:
    """Follows the budget file named by $READALOUD_THREADS_FILE (checked at most every `every` s)."""

    def __init__(self, threads: int = 0, every: float = 2.0, path: str | Path | None = None):
        self.path = Path(path) if path else (Path(os.environ[THREADS_FILE_ENV])
                                             if os.environ.get(THREADS_FILE_ENV) else None)
        self.every = every
        self._next = 0.0
        self._mtime: int | None = None
        self.threads = threads if threads > 0 else torch.get_num_threads()
        if threads > 0:
            torch.set_num_threads(threads)

    def poll(self) -> int:
        """Apply a changed budget; cheap enough to call every batch."""
        now = time.monotonic()
        if self.path is None or now < self._next:
            return self.threads
        self._next = now + self.every
        try:
            mtime = self.path.stat().st_mtime_ns
            if mtime == self._mtime:
                return self.threads
            self._mtime = mtime
            n = int(self.path.read_text().strip())
        except (OSError, ValueError):
            return self.threads  # no file, or the runner is replacing it: keep what we have
        if n > 0 and n != self.threads:
            log.info("thread budget: %d -> %d torch threads", self.threads, n)
            torch.set_num_threads(n)
            self.threads = n
        return self.threads
