"""Caches follow the clips' content, not their names.

Every cache of a data folder (`<data>/cache/`: clip features, Whisper encoder outputs, ASR
evidence, closed and prompted decodes, alignment features, the bad-clip list, ear copies) keys a
clip by its file name. A clip replaced by other audio under the same name, or deleted, must never
be scored from what the caches hold for the old one. So every pipeline step that reads a folder's
clips first calls `sync_clip_caches`: it hashes each listed clip (SHA-1 of the file's bytes, or
"missing"), compares with the digest the caches last saw (`<data>/cache/clip_digests.csv`), and
forgets a clip whose content changed in every cache of the folder, so it is recomputed from the
file as it is now. A clip the manifest has never seen is forgotten the same way (caches written
before the manifest existed cannot vouch for it). Hashing reads every listed file once per step;
docs/benchmarks.md gives its measured cost.

The caches are found by their shapes, one rule each, so a new cache that follows one of them is
covered without a change here: a FeatureStore's `<name>.index.csv` (key column), a `.npz` table
whose key arrays are named `keys` or `<prefix>_keys` with the rows of the arrays of the same
prefix aligned to them (keys are the file name, or the file name then a tab and more), the bad-clip
list (`bad_clips.csv`; the fold files are no cache and stay), and an `ear_*` folder of copies named `<stem>.ear<k>.wav`
with caches of its own.
"""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..checkpoints import atomic_csv, atomic_write
from ..features import file_lock
from ..layout import bad_clips_path, cache_dir

log = logging.getLogger(__name__)

MANIFEST = "clip_digests.csv"
MISSING = "missing"


def clip_digest(path: Path) -> str:
    """SHA-1 of the file's bytes (first 16 hex digits), or "missing"."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha1").hexdigest()[:16]
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return MISSING


def _read_manifest(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        return dict(zip(df["filename"], df["digest"]))
    except Exception as exc:  # a damaged manifest: every clip is treated as unseen (recomputed), never trusted
        log.warning("%s is unreadable (%s): every listed clip's cached values are recomputed", path, exc)
        return {}


def known_digests(folder: str | Path) -> dict[str, str]:
    """{filename: digest} of the clips the folder's caches last saw (what sync_clip_caches recorded)."""
    return _read_manifest(cache_dir(folder) / MANIFEST)


def _belongs(key: str, names: set[str]) -> bool:
    return key in names or key.split("\t", 1)[0] in names


def _forget_in_index(index: Path, names: set[str]) -> int:
    """Drop the keys of `names` from a FeatureStore index (under the store's lock)."""
    store = index.name[: -len(".index.csv")]
    with file_lock(index.with_name(f".{store}.lock")):
        df = pd.read_csv(index, dtype={"key": str}, keep_default_na=False)
        drop = df["key"].isin(names)
        if drop.any():
            atomic_csv(df[~drop], index)
        return int(drop.sum())


def _forget_in_npz(path: Path, names: set[str]) -> int:
    """Drop the rows keyed by `names` from every key group of an npz table (under its lock)."""
    with file_lock(path.with_name(f".{path.name}.lock")):
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception:   # a damaged cache is recomputed by its reader anyway
            return 0
        dropped = 0
        groups = [k[: -len("keys")] for k in arrays if k == "keys" or k.endswith("_keys")]
        for prefix in groups:
            keys = arrays[f"{prefix}keys"]
            keep = np.array([not _belongs(str(k), names) for k in keys.tolist()], bool)
            if keep.all():
                continue
            dropped += int((~keep).sum())
            members = [k for k in arrays if k.startswith(prefix) and (prefix or not any(
                k.startswith(p) for p in groups if p)) and arrays[k].ndim >= 1 and len(arrays[k]) == len(keys)]
            for k in members:
                arrays[k] = arrays[k][keep]
        if dropped:
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            atomic_write(path, buf.getvalue())
        return dropped


def _forget_in_csv(path: Path, names: set[str]) -> int:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "filename" not in df.columns:
        return 0
    drop = df["filename"].isin(names)
    if drop.any():
        atomic_csv(df[~drop], path)
    return int(drop.sum())


def forget_clips(folder: str | Path, names: set[str]) -> int:
    """Forget `names` in every cache of `folder` (and their ear copies with the copies' caches).
    Returns how many cached entries were dropped."""
    root = cache_dir(folder)
    if not names or not root.is_dir():
        return 0
    dropped = 0
    for index in root.glob("*.index.csv"):
        dropped += _forget_in_index(index, names)
    for table in root.glob("*.npz"):
        dropped += _forget_in_npz(table, names)
    if bad_clips_path(folder).exists():   # folds_<k>.csv is no cache: a clip keeps its fold whatever it says
        dropped += _forget_in_csv(bad_clips_path(folder), names)
    for copies in root.glob("ear_*"):
        if not copies.is_dir():
            continue
        stems = {Path(n).stem for n in names}
        stale = {p.name for p in copies.glob("*.ear*.wav") if p.name.split(".ear", 1)[0] in stems}
        for name in stale:
            (copies / name).unlink(missing_ok=True)
        dropped += len(stale) + forget_clips(copies, stale)
    return dropped


def sync_clip_caches(folder: str | Path, filenames) -> list[str]:
    """Forget, in every cache of `folder`, the listed clips whose content differs from what the caches
    last saw (or that the manifest has never seen); record their digests now. Returns the names of
    the clips whose content changed (a clip never seen before is not counted as changed)."""
    folder = Path(folder)
    names = list(dict.fromkeys(str(f) for f in filenames))
    root = cache_dir(folder)
    if not names or not root.is_dir():
        return []
    manifest = root / MANIFEST
    with file_lock(root / f".{MANIFEST}.lock"):
        seen = _read_manifest(manifest)
        now = {name: clip_digest(folder / name) for name in names}
        stale = {name for name, digest in now.items() if seen.get(name) != digest}
        changed = sorted(name for name in stale if name in seen)
        if stale:
            dropped = forget_clips(folder, stale)
            if changed:
                log.warning("%d clip(s) of %s changed since their values were cached (%s%s): recomputed from "
                            "the files as they are now (%d cached entries dropped)", len(changed), folder,
                            ", ".join(changed[:10]), f" +{len(changed) - 10} more" if len(changed) > 10 else "",
                            dropped)
            seen.update(now)
            atomic_csv(pd.DataFrame(sorted(seen.items()), columns=["filename", "digest"]), manifest)
    return changed
