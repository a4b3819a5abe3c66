"""One fold assignment per (data set, k), written once and read by every trainer and checker.

Three schemes (`preprocess.py --fold_by`, `--groups`):
- "stratified" (default): round-robin within (task, score) strata. Clips of one child land in
  every fold, so out-of-fold predictions are for children the model has heard.
- "voice": clips are clustered by voice (mean and spread of their speech frames' cepstra, which
  carry the speaker and the microphone far more than the words) into one group per fold. A
  fold then holds voices the other folds' models never heard, so OOF log loss, early stopping
  and the ensemble weights measure what matters for new children. With a handful of speakers
  (the digit-span set) each fold is whole speakers; with many it is a region of voice space.
- "groups" (`preprocess.py --groups FILE`, a CSV of filename and group, e.g. each child's id):
  every group lies inside one fold, folds balanced by size and by (task, score) as far as the
  groups allow. With children's ids this is the exact form of "voice": OOF = unheard children.

Deterministic (fixed seeds), and kept in a file so that folds can never silently disagree
between processes or versions; `folds_<k>.json` beside it records the scheme, and `folds.json`
which k is the data set's: every step after preprocess.py reads the fold count from there.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..checkpoints import atomic_csv, atomic_write
from ..layout import current_folds_path, fold_files, fold_path, fold_scheme_path

FOLD_SEED = 42
SCHEMES = ("stratified", "voice", "groups")
DEFAULT_SCHEME = "stratified"  # what a fold file with no scheme record was made with, and a new one without a choice
UNHEARD_SCHEMES = ("voice", "groups")  # schemes whose OOF clips are speakers the fold's model never heard


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


@dataclass(frozen=True)
class ClipGroups:
    """Each clip's group (e.g. its child), read from `path`'s column `column`."""
    path: Path
    column: str
    of: dict[str, str]

    def for_meta(self, meta: pd.DataFrame) -> pd.Series:
        """The group of each row of `meta`; a clip the file does not name is an error naming both."""
        missing = [f for f in meta["filename"] if f not in self.of]
        if missing:
            raise ValueError(f"{self.path} names no group for {len(missing)} of {len(meta)} training clips "
                             f"(first: {', '.join(missing[:5])}): every clip needs a row "
                             f"'filename,{self.column}'")
        return meta["filename"].map(self.of).astype(str)


def read_groups(path: str | Path) -> ClipGroups:
    """A groups file: a CSV with `filename` and `group` (else `speaker`, as speakers.csv has).

    A file that gives one clip two groups, or has neither column, is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"groups file {path} not found")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    column = next((c for c in ("group", "speaker") if c in df.columns), None)
    if "filename" not in df.columns or column is None:
        raise ValueError(f"{path} needs columns 'filename' and 'group' (or 'speaker'); it has {list(df.columns)}")
    empty = df[df[column].str.strip() == ""]
    if len(empty):
        raise ValueError(f"{path} row {empty.index[0] + 2}: empty {column} for {empty['filename'].iloc[0]}")
    clashes = df.groupby("filename")[column].nunique()
    clashes = clashes[clashes > 1]
    if len(clashes):
        raise ValueError(f"{path} gives {clashes.index[0]} more than one {column} "
                         f"({sorted(df.loc[df['filename'] == clashes.index[0], column].unique())})")
    return ClipGroups(path, column, dict(zip(df["filename"], df[column])))


def assign_group_folds(meta: pd.DataFrame, groups: pd.Series, n_folds: int, seed: int = FOLD_SEED) -> pd.Series:
    """Whole groups to folds, largest first (ties in a seeded shuffle), each to the fold where it
    least unbalances the fold sizes and the (task, score) strata; the first k fill the k folds."""
    if n_folds < 2:
        raise ValueError(f"--n_folds must be at least 2, got {n_folds}")
    names = sorted(groups.unique())
    if len(names) < n_folds:
        raise ValueError(f"cannot split {len(names)} groups into {n_folds} folds: every fold needs a whole group")
    strata = meta["task"].astype(str) + "|" + meta["score"].astype(str)
    counts = pd.crosstab(groups.to_numpy(), strata.to_numpy()).reindex(names).to_numpy(float)  # group x stratum
    sizes = counts.sum(1)
    order = np.random.default_rng(seed).permutation(len(names))
    order = order[np.argsort(-sizes[order], kind="stable")]
    target_strata, target_size = counts.sum(0) / n_folds, sizes.sum() / n_folds
    fold_strata, fold_size = np.zeros((n_folds, counts.shape[1])), np.zeros(n_folds)
    fold_of = np.empty(len(names), int)
    for g in order:
        # growth of the squared excess over the targets (the term every fold shares left out)
        cost = (fold_strata - target_strata) @ counts[g] + sizes[g] * (fold_size - target_size)
        if (fold_size == 0).any():  # every fold gets one of the k largest groups first
            cost[fold_size > 0] = np.inf
        f = int(np.argmin(cost))
        fold_of[g] = f
        fold_strata[f] += counts[g]
        fold_size[f] += sizes[g]
    fold_by_name = dict(zip(names, fold_of))
    return pd.Series(groups.map(fold_by_name).to_numpy(int), index=meta.index, dtype=int)


def split_groups(folds: pd.Series, groups: pd.Series) -> list[str]:
    """Groups whose clips lie in more than one fold."""
    n = pd.Series(folds.to_numpy()).groupby(groups.to_numpy()).nunique()
    return sorted(n[n > 1].index)


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


def scheme_record(data_dir: str | Path, n_folds: int) -> dict:
    """What `folds_<k>.json` records of how the fold file was made ({} when nothing is)."""
    if not Path(data_dir).is_dir():
        return {}
    scheme_path = fold_scheme_path(data_dir, n_folds)
    return json.loads(scheme_path.read_text()) if scheme_path.exists() else {}


def fold_scheme(data_dir: str | Path, n_folds: int) -> str:
    """"stratified", "voice" or "groups": how the data set's fold file was made (stratified if unrecorded)."""
    return scheme_record(data_dir, n_folds).get("fold_by", DEFAULT_SCHEME)


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
                         clips=None, groups: ClipGroups | None = None, seed: int | None = None) -> pd.Series:
    """Fold of each row of `meta` (indexed like it), from the data set's fold file.

    The file is made once (`fold_by` "stratified"; "voice" with the clip feature store; "groups"
    with `groups`, the default when they are given; drawn with `seed`, FOLD_SEED when None) and
    then read by every process; asking for another scheme or another seed than the file's is an
    error, and so is a groups file the folds split. Another seed is another draw of the same
    scheme: the way to check that a choice holds for more than one grouping of the children."""
    path = fold_path(data_dir, n_folds)
    scheme_path = fold_scheme_path(data_dir, n_folds)
    if groups is not None:
        if fold_by not in (None, "groups"):
            raise ValueError(f"a groups file ({groups.path}) makes 'groups' folds, not {fold_by!r}")
        fold_by = "groups"
    if path.exists():
        recorded = scheme_record(data_dir, n_folds)
        scheme, drawn = recorded.get("fold_by", DEFAULT_SCHEME), recorded.get("seed", FOLD_SEED)
        if fold_by and fold_by != scheme:
            raise ValueError(f"{path} holds {scheme} folds, not {fold_by}: delete it (and the trained folds "
                             f"in assets/) to change the scheme")
        if seed is not None and seed != drawn:
            raise ValueError(f"{path} holds folds drawn with seed {drawn}, not {seed}: delete it (and the trained "
                             f"folds in assets/) to draw them again")
        df = pd.read_csv(path, dtype={"filename": str})
        mapping = dict(zip(df["filename"], df["fold"]))
        missing = ~meta["filename"].isin(mapping)
        if missing.any():
            raise ValueError(f"{path} has no fold for {int(missing.sum())} training clips "
                             f"(e.g. {meta.loc[missing, 'filename'].iloc[0]}); the training metadata "
                             f"changed: delete {path} and rerun preprocess.py")
        folds = meta["filename"].map(mapping).astype(int)
        split = split_groups(folds, groups.for_meta(meta)) if groups is not None else []
        if split:
            raise ValueError(f"{path} splits {len(split)} groups of {groups.path} over several folds "
                             f"(first: {', '.join(split[:5])}): delete it (and the trained folds) to regroup")
        return folds
    fold_by = fold_by or DEFAULT_SCHEME
    seed = FOLD_SEED if seed is None else seed
    scheme = {"fold_by": fold_by, "n_folds": n_folds, "seed": seed}
    if fold_by == "voice":
        if clips is None:
            raise ValueError("voice folds are made by preprocess.py --fold_by voice (they need the clip features)")
        folds = assign_voice_folds(meta, clips, n_folds, seed)
    elif fold_by == "stratified":
        folds = assign_folds(meta, n_folds, seed)
    elif fold_by == "groups":
        if groups is None:
            raise ValueError("groups folds are made by preprocess.py --groups FILE (a CSV of filename,group)")
        folds = assign_group_folds(meta, groups.for_meta(meta), n_folds, seed)
        scheme |= {"groups_file": str(groups.path), "group_column": groups.column}
    else:
        raise ValueError(f"--fold_by must be one of {', '.join(SCHEMES)}, got {fold_by!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_csv(pd.DataFrame({"filename": meta["filename"], "fold": folds}), path)
    atomic_write(scheme_path, json.dumps(scheme))
    mark_current(data_dir, n_folds)
    return folds
