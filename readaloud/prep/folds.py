"""One fold assignment per (data set, k), written once and read by every trainer and checker.

Two schemes (`preprocess.py --fold_by`):
- "stratified" (default): round-robin within (task, score) strata. Clips of one child land in
  every fold, so out-of-fold predictions are for children the model has heard.
- "voice": clips are clustered by voice (mean and spread of their speech frames' cepstra, which
  carry the speaker and the microphone far more than the words) into one group per fold. A
  fold then holds voices the other folds' models never heard, so OOF log loss, early stopping
  and the ensemble weights measure what matters for new children. With a handful of speakers
  (the digit-span set) each fold is whole speakers; with many it is a region of voice space.

Deterministic (fixed seeds), and kept in a file so that folds can never silently disagree
between processes or versions; `folds_<k>.json` beside it records the scheme, and `folds.json`
which k is the data set's: every step after preprocess.py reads the fold count from there.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..checkpoints import atomic_csv, atomic_write
from ..layout import current_folds_path, fold_files, fold_path, fold_scheme_path

FOLD_SEED = 42


class FoldFileError(ValueError):
    """No fold file, or not the one asked for: says which exist and how to make one."""


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


VOICE_CEPS = 20  # c1..c19: spectral envelope (speaker, microphone); c0 (level) left out


def voice_embedding(frames: np.ndarray, n_ceps: int = VOICE_CEPS) -> np.ndarray:
    """Mean and standard deviation of cepstra c1..c{n_ceps-1} over a clip's speech frames."""
    from scipy.fft import dct
    frames = np.asarray(frames, np.float32)
    if frames.shape[0] == 0:
        return np.full(2 * (n_ceps - 1), np.nan, np.float32)
    energy = frames.mean(1)
    speech = frames[energy >= energy.max() - 0.5] if frames.shape[0] > 4 else frames  # ~20 dB below the peak
    ceps = dct(speech, type=2, norm="ortho", axis=1)[:, 1:n_ceps]
    return np.concatenate([ceps.mean(0), ceps.std(0)]).astype(np.float32)


def assign_voice_folds(meta: pd.DataFrame, clips, n_folds: int, seed: int = FOLD_SEED) -> pd.Series:
    """One k-means voice cluster per fold; clips without features join the nearest fold by size."""
    from sklearn.cluster import KMeans
    if len(meta) < n_folds:
        raise ValueError(f"cannot split {len(meta)} training clips into {n_folds} folds")
    missing = np.full(2 * (VOICE_CEPS - 1), np.nan, np.float32)
    emb = np.stack([voice_embedding(clips.get(f)) if f in clips else missing
                    for f in meta["filename"]])
    ok = np.isfinite(emb).all(1)
    if ok.sum() < n_folds:
        raise ValueError("voice folds need cached features for the training clips: run preprocess.py")
    x = emb[ok]
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    labels = KMeans(n_clusters=n_folds, n_init=10, random_state=seed).fit_predict(x)
    order = np.argsort(-np.bincount(labels, minlength=n_folds), kind="stable")  # fold 0 = largest voice group
    rank = np.empty(n_folds, int)
    rank[order] = np.arange(n_folds)
    folds = pd.Series(-1, index=meta.index, dtype=int)
    folds.iloc[np.flatnonzero(ok)] = rank[labels]
    for i in np.flatnonzero(~ok):  # unusable clips: spread them over the smallest folds
        folds.iloc[i] = int(folds[folds >= 0].value_counts().reindex(range(n_folds), fill_value=0).idxmin())
    return folds


def fold_scheme(data_dir: str | Path, n_folds: int) -> str:
    """"voice" or "stratified": how the data set's fold file was made (stratified if unrecorded)."""
    if not Path(data_dir).is_dir():
        return "stratified"
    scheme_path = fold_scheme_path(data_dir, n_folds)
    return json.loads(scheme_path.read_text())["fold_by"] if scheme_path.exists() else "stratified"


def data_set_n_folds(data_dir: str | Path) -> int:
    """The fold count of the data set's fold file (the one preprocess.py made or confirmed last)."""
    files = fold_files(data_dir)
    if not files:
        raise FoldFileError(f"no fold file in {Path(data_dir) / 'cache'}: run preprocess.py --data {data_dir} "
                            f"--n_folds K first")
    if len(files) == 1:
        return next(iter(files))
    try:
        k = int(json.loads(current_folds_path(data_dir).read_text())["n_folds"])
        if k in files:
            return k
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise FoldFileError(f"{Path(data_dir) / 'cache'} holds fold files for k = {sorted(files)} and none is marked "
                        f"as the data set's: rerun preprocess.py --data {data_dir} --n_folds K for the one to use")


def resolve_n_folds(data_dir: str | Path, asked: int | None = None) -> int:
    """The fold count every step after preprocess.py uses: the fold file's. `asked` (an
    --n_folds given anyway) must agree with it; with no fold file yet it is the count to make."""
    if asked is None:
        return data_set_n_folds(data_dir)
    if asked < 2:
        raise FoldFileError(f"--n_folds must be at least 2, got {asked}")
    files = fold_files(data_dir)
    if files and asked not in files:
        raise FoldFileError(f"--n_folds {asked} disagrees with the fold file of {data_dir} "
                            f"({data_set_n_folds(data_dir)} folds): leave --n_folds out, or run "
                            f"preprocess.py --data {data_dir} --n_folds {asked} to make that split")
    return asked


def mark_current(data_dir: str | Path, n_folds: int) -> None:
    """Record `folds_<n_folds>.csv` as the data set's fold file."""
    atomic_write(current_folds_path(data_dir), json.dumps({"n_folds": n_folds}))


def load_or_create_folds(data_dir: str | Path, meta: pd.DataFrame, n_folds: int, fold_by: str | None = None,
                         clips=None) -> pd.Series:
    """Fold of each row of `meta` (indexed like it), from the data set's fold file.

    The file is made once (`fold_by` "stratified", or "voice" with the clip feature store) and
    then read by every process; asking for another scheme than the file's is an error."""
    path = fold_path(data_dir, n_folds)
    scheme_path = fold_scheme_path(data_dir, n_folds)
    if path.exists():
        scheme = fold_scheme(data_dir, n_folds)
        if fold_by and fold_by != scheme:
            raise ValueError(f"{path} holds {scheme} folds, not {fold_by}: delete it (and the trained folds "
                             f"in assets/) to change the scheme")
        df = pd.read_csv(path, dtype={"filename": str})
        mapping = dict(zip(df["filename"], df["fold"]))
        missing = ~meta["filename"].isin(mapping)
        if missing.any():
            raise ValueError(f"{path} has no fold for {int(missing.sum())} training clips "
                             f"(e.g. {meta.loc[missing, 'filename'].iloc[0]}); the training metadata "
                             f"changed: delete {path} and rerun preprocess.py")
        return meta["filename"].map(mapping).astype(int)
    fold_by = fold_by or "stratified"
    if fold_by == "voice":
        if clips is None:
            raise ValueError("voice folds are made by preprocess.py --fold_by voice (they need the clip features)")
        folds = assign_voice_folds(meta, clips, n_folds)
    elif fold_by == "stratified":
        folds = assign_folds(meta, n_folds)
    else:
        raise ValueError(f"--fold_by must be 'stratified' or 'voice', got {fold_by!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_csv(pd.DataFrame({"filename": meta["filename"], "fold": folds}), path)
    atomic_write(scheme_path, json.dumps({"fold_by": fold_by, "n_folds": n_folds}))
    mark_current(data_dir, n_folds)
    return folds
