"""Reviewers' corrections into the training labels (`preprocess.py --corrections FILE`).

FILE is a CSV in the train_labels.csv format (filename,score), as the review page of
`infer.py --report` downloads it. Each row either corrects a training clip's label (a filename of
train_metadata.csv) or adds a test clip to training (a filename of test_metadata.csv only: its
metadata row is copied into train_metadata.csv and its score into train_labels.csv). Nothing is
written unless every row is usable; a problem names the file, the line and the value. The data
folder's CSVs are rewritten in place (their first versions kept once as
`train_metadata.before_corrections.csv` / `train_labels.before_corrections.csv`), and every
change is appended to `corrections_log.csv` beside them. Applying the same file twice changes
nothing the second time.

An added clip needs a fold: the data set's current fold file is extended (the clip goes to its
group's fold with a groups file, else to the fold with the fewest clips of its task; voice folds
are not reclustered, so an added clip's voice may also be in other folds), so every clip already
there keeps its fold. Checkpoints trained before are stale: retrain with
`train.py --force`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .checkpoints import atomic_csv
from .data import LABEL_COLUMNS, META_COLUMNS, DataError, read_csv
from .layout import fold_path

log = logging.getLogger("readaloud.corrections")

LOG_NAME = "corrections_log.csv"
LOG_COLUMNS = ["applied", "source", "filename", "action", "old_score", "new_score"]


@dataclass
class Applied:
    """What one corrections file changed."""
    source: Path
    corrected: list[tuple[str, int, int]] = field(default_factory=list)   # (filename, old, new)
    added: list[tuple[str, int]] = field(default_factory=list)            # (filename, score)
    unchanged: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.corrected or self.added)

    def lines(self, limit: int = 20) -> list[str]:
        out = [f"corrections from {self.source}: {len(self.corrected)} training label(s) corrected, "
               f"{len(self.added)} test clip(s) added to training, {len(self.unchanged)} already as given"]
        out += [f"  corrected {name}: {old} -> {new}" for name, old, new in self.corrected[:limit]]
        out += [f"  added {name}: score {score}" for name, score in self.added[:limit]]
        hidden = max(0, len(self.corrected) - limit) + max(0, len(self.added) - limit)
        if hidden:
            out.append(f"  (+{hidden} more in {LOG_NAME})")
        return out


def read_corrections(path: str | Path) -> pd.DataFrame:
    """filename, score (0 or 1) of a corrections CSV; every bad row is named at once."""
    path = Path(path)
    table = read_csv(path, LABEL_COLUMNS)
    table["filename"] = table["filename"].str.strip()
    problems = []
    empty = table["filename"] == ""
    if empty.any():
        problems.append(f"{path}: empty filename at line(s) {_lines(table.index[empty])}")
    score = table["score"].str.strip()
    bad = ~score.isin(["0", "1", "0.0", "1.0"])
    if bad.any():
        problems.append(f"{path}: score must be 0 or 1 at " +
                        ", ".join(f"line {i + 2}: {table.loc[i, 'filename']} {table.loc[i, 'score']!r}"
                                  for i in table.index[bad][:8]))
    seen = table[~empty & ~bad].assign(score=score[~empty & ~bad].astype(float).astype(int))
    clash = seen.groupby("filename")["score"].nunique()
    clash = clash[clash > 1]
    if len(clash):
        problems.append(f"{path}: both 0 and 1 given for " + ", ".join(
            f"{name} (lines {_lines(seen.index[seen['filename'] == name])})" for name in clash.index[:8]))
    if problems:
        raise DataError("\n".join(problems))
    return seen[["filename", "score"]].drop_duplicates("filename").reset_index(drop=True)


def _lines(index) -> str:
    return ", ".join(str(i + 2) for i in list(index)[:8]) + (" ..." if len(index) > 8 else "")


def apply_corrections(data_dir: str | Path, path: str | Path) -> Applied:
    """Correct and extend the training labels of `data_dir` with the corrections CSV `path`."""
    data_dir, path = Path(data_dir), Path(path)
    corrections = read_corrections(path)
    meta_path, labels_path = data_dir / "train_metadata.csv", data_dir / "train_labels.csv"
    train_meta = read_csv(meta_path, META_COLUMNS)
    train_labels = read_csv(labels_path, LABEL_COLUMNS)
    test_path = data_dir / "test_metadata.csv"
    test_meta = read_csv(test_path, META_COLUMNS) if test_path.exists() else pd.DataFrame(columns=META_COLUMNS)
    in_train = set(train_meta["filename"])
    test_rows = test_meta.drop_duplicates("filename").set_index("filename")
    unknown = corrections[~corrections["filename"].isin(in_train | set(test_rows.index))]
    if len(unknown):
        raise DataError(f"{path}: {len(unknown)} filename(s) in neither {meta_path.name} nor {test_path.name} of "
                        f"{data_dir}: " + ", ".join(f"line {i + 2}: {name!r}" for i, name in
                                                    zip(unknown.index[:8], unknown["filename"][:8])))
    joining = test_rows.loc[[n for n in corrections["filename"] if n not in in_train]]
    unusable = joining[(joining["task"].str.strip() == "") | (joining["expected_text"].str.strip() == "")]
    if len(unusable):
        raise DataError(f"{path}: test clip(s) with an empty task or expected_text in {test_path} cannot join "
                        f"training: " + ", ".join(f"{name} (task {r['task']!r}, expected_text {r['expected_text']!r})"
                                                   for name, r in unusable.head(8).iterrows()))
    old = dict(zip(train_labels["filename"], train_labels["score"].str.strip()))
    applied = Applied(path)
    labels = train_labels.copy()
    added_meta = []
    for name, score in zip(corrections["filename"], corrections["score"]):
        if name in in_train:
            before = old.get(name)
            before_int = int(float(before)) if before in ("0", "1", "0.0", "1.0") else None
            if before_int == score:
                applied.unchanged.append(name)
                continue
            if before is None:  # a training clip with no label row: train_labels.csv gains it
                labels = pd.concat([labels, pd.DataFrame([{"filename": name, "score": str(score)}])], ignore_index=True)
            else:
                labels.loc[labels["filename"] == name, "score"] = str(score)
            applied.corrected.append((name, before_int if before_int is not None else -1, score))
        else:
            row = {c: test_rows.loc[name, c] if c in test_rows.columns else "" for c in train_meta.columns if c != "filename"}
            added_meta.append({"filename": name, **row})
            labels = pd.concat([labels, pd.DataFrame([{"filename": name, "score": str(score)}])], ignore_index=True)
            applied.added.append((name, score))
    if not applied.changed:
        return applied
    for original, backup in ((meta_path, "train_metadata.before_corrections.csv"),
                             (labels_path, "train_labels.before_corrections.csv")):
        if not (data_dir / backup).exists():
            (data_dir / backup).write_bytes(original.read_bytes())
    if added_meta:
        atomic_csv(pd.concat([train_meta, pd.DataFrame(added_meta, columns=train_meta.columns)], ignore_index=True),
                   meta_path)
    atomic_csv(labels[[c for c in train_labels.columns]], labels_path)
    _append_log(data_dir, applied)
    return applied


def _append_log(data_dir: Path, applied: Applied) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    records = [[stamp, str(applied.source), n, "corrected", "" if o < 0 else o, s] for n, o, s in applied.corrected]
    records += [[stamp, str(applied.source), n, "added from test", "", s] for n, s in applied.added]
    path = data_dir / LOG_NAME
    earlier = pd.read_csv(path, dtype=str, keep_default_na=False) if path.exists() else pd.DataFrame(columns=LOG_COLUMNS)
    atomic_csv(pd.concat([earlier, pd.DataFrame(records, columns=LOG_COLUMNS).astype(str)], ignore_index=True), path)


def extend_folds(data_dir: str | Path, n_folds: int, train_meta: pd.DataFrame, groups=None) -> list[str]:
    """Give every training clip the fold file of `n_folds` lacks a fold (an added clip): its group's
    fold when `groups` (prep.folds.ClipGroups) knows one, else the fold with the fewest clips of its
    task (then the fewest clips). Returns the clips placed; no fold file yet: nothing to do."""
    path = fold_path(data_dir, n_folds)
    if not path.exists():
        return []
    folds = pd.read_csv(path, dtype={"filename": str})
    known = set(folds["filename"])
    new = train_meta[~train_meta["filename"].isin(known)]
    if new.empty:
        return []
    task_of = dict(zip(train_meta["filename"], train_meta["task"]))
    count = {(k, t): 0 for k in range(n_folds) for t in set(train_meta["task"])}
    size = {k: 0 for k in range(n_folds)}
    for name, fold in zip(folds["filename"], folds["fold"]):
        count[(int(fold), task_of.get(name, ""))] = count.get((int(fold), task_of.get(name, "")), 0) + 1
        size[int(fold)] += 1
    group_of = {str(k): str(v) for k, v in groups.of.items()} if groups is not None else {}
    group_fold = {}
    for name, fold in zip(folds["filename"], folds["fold"]):
        if name in group_of:
            group_fold.setdefault(group_of[name], int(fold))
    placed = []
    for name, task in zip(new["filename"], new["task"]):
        fold = group_fold.get(group_of.get(name))
        if fold is None:
            fold = min(range(n_folds), key=lambda k: (count.get((k, task), 0), size[k], k))
            if name in group_of:
                group_fold[group_of[name]] = fold
        count[(fold, task)] = count.get((fold, task), 0) + 1
        size[fold] += 1
        placed.append((name, fold))
    atomic_csv(pd.concat([folds, pd.DataFrame(placed, columns=["filename", "fold"])], ignore_index=True), path)
    log.info("folds: %d added clip(s) placed in %s", len(placed), path)
    return [name for name, _ in placed]
