"""One fold assignment per (data set, k), written once and read by every trainer and checker.

Stratified by task and score with a fixed seed, so it is deterministic; still, it is kept
in a file so that folds can never silently disagree between processes or versions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoints import atomic_csv

FOLD_SEED = 42


def fold_path(data_dir: str | Path, n_folds: int) -> Path:
    from .prepare import cache_dir
    return cache_dir(data_dir) / f"folds_{n_folds}.csv"


def assign_folds(meta: pd.DataFrame, n_folds: int, seed: int = FOLD_SEED) -> pd.Series:
    """Round-robin within shuffled (task, score) strata: every fold gets each stratum evenly."""
    if n_folds < 2:
        raise ValueError(f"--n_folds must be at least 2, got {n_folds}")
    if len(meta) < n_folds:
        raise ValueError(f"cannot split {len(meta)} training clips into {n_folds} folds")
    rng = np.random.default_rng(seed)
    folds = pd.Series(-1, index=meta.index, dtype=int)
    strata = meta["task"].astype(str) + "|" + meta["score"].astype(str)
    offset = 0
    for _, idx in sorted(strata.groupby(strata).groups.items()):
        idx = np.array(idx)
        rng.shuffle(idx)
        folds.loc[idx] = (np.arange(len(idx)) + offset) % n_folds
        offset += len(idx)  # rotate so small strata do not all start at fold 0
    return folds


def load_or_create_folds(data_dir: str | Path, meta: pd.DataFrame, n_folds: int) -> pd.Series:
    """Fold of each row of `meta` (indexed like it), from the data set's fold file."""
    path = fold_path(data_dir, n_folds)
    if path.exists():
        df = pd.read_csv(path, dtype={"filename": str})
        mapping = dict(zip(df["filename"], df["fold"]))
        missing = ~meta["filename"].isin(mapping)
        if missing.any():
            raise ValueError(f"{path} has no fold for {int(missing.sum())} training clips "
                             f"(e.g. {meta.loc[missing, 'filename'].iloc[0]}); the training metadata "
                             f"changed: delete {path} and rerun preprocess.py")
        return meta["filename"].map(mapping).astype(int)
    folds = assign_folds(meta, n_folds)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_csv(pd.DataFrame({"filename": meta["filename"], "fold": folds}), path)
    return folds
