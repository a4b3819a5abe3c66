"""Saving and loading weights: atomic writes, safe reads, errors that say what to do.

A save goes to a temporary file in the same folder and is renamed over the target, so a
process killed mid-save leaves the old file or the new one, never half of one. Loads use
`weights_only=True`: a checkpoint is tensors and plain containers, never arbitrary pickles.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    pass


# set by pipeline/inference.py load_fold_model on a loaded checkpoint dict: the folder it was read from
# (what a family keeps beside its checkpoints, e.g. the ear a gbm fold reads test rows with)
CHECKPOINT_FOLDER = "_checkpoint_folder"


def atomic_save(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write text or bytes to `path` through a temporary file renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_csv(df, path: str | Path) -> None:
    """A pandas table as CSV (no index), written atomically."""
    atomic_write(path, df.to_csv(index=False))


def safe_load(path: str | Path, map_location="cpu", fix: str = "") -> dict:
    """torch.load with weights_only=True; a missing, empty or broken file gets a clear error."""
    path = Path(path)
    hint = f" To fix: {fix}" if fix else ""
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found.{hint}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint is empty (0 bytes), probably an interrupted save.{hint}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}).{hint}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a readaloud checkpoint.{hint}")
    return obj


def clean_temp_files(folder: str | Path) -> int:
    """Remove leftovers of interrupted atomic writes (.name.tmpPID)."""
    n = 0
    for p in Path(folder).glob(".*.tmp*"):
        try:
            pid = int(p.name.rsplit(".tmp", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            p.unlink(missing_ok=True)
            n += 1
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError, OSError):
        return False
