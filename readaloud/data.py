"""The competition's file layout: reading and checking the metadata.

Problems are gathered and reported together, naming the file, rows and values, so a user
fixes a broken CSV in one go instead of one crash at a time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

META_COLUMNS = ["filename", "task", "expected_text", "grade"]
LABEL_COLUMNS = ["filename", "score"]
KNOWN_TASKS = ["deletion", "blending", "nonword_repetition", "sentence_repetition"]
KNOWN_GRADES = ["KG", "1", "2", "3"]


class DataError(ValueError):
    """Bad metadata; the message lists every problem found."""


def _show_rows(df: pd.DataFrame, mask, column: str, limit: int = 8) -> str:
    bad = df.loc[mask]
    named = column != "filename" and "filename" in df.columns   # the value, and whose row it is
    shown = ", ".join(f"row {i + 2}" + (f" ({bad.loc[i, 'filename']})" if named else "") + f": {bad.loc[i, column]!r}"
                      for i in bad.index[:limit])
    more = f" (+{len(bad) - limit} more)" if len(bad) > limit else ""
    return shown + more


def read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    """Read a CSV as strings and check it has `columns` (row numbers in messages are file lines)."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise DataError(f"{path}: cannot parse CSV ({exc})") from exc
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    return df.reset_index(drop=True)


def _row_checks(df: pd.DataFrame) -> list[tuple[pd.Series, str]]:
    """(mask, what is wrong) for each problem a single row can have."""
    empty_name = df["filename"].str.strip() == ""
    checks = [(df["filename"].duplicated(keep=False), "duplicate filenames"),
              (empty_name, "empty filename")]
    for column in ("expected_text", "task"):
        if column in df:
            checks.append((df[column].str.strip() == "", f"empty {column}"))
    return checks


def check_metadata(df: pd.DataFrame, path: Path, audio_dir: Path | None = None) -> list[str]:
    """Every problem in a metadata table, as readable lines (empty list = fine)."""
    problems = [f"{path}: {what} at {_show_rows(df, mask, 'filename')}" for mask, what in _row_checks(df)
                if mask.any()]
    if audio_dir is not None:
        absent = ~df["filename"].map(lambda f: (audio_dir / f).is_file())
        absent &= df["filename"].str.strip() != ""
        if absent.any():
            problems.append(f"{path}: listed audio not found in {audio_dir} at "
                            f"{_show_rows(df, absent, 'filename')}")
    return problems


def normalise_grade(value: str) -> str:
    """'K', 'kg', 'kindergarten' -> 'KG'; '1.0' -> '1'; other values are kept as given."""
    v = str(value).strip()
    if v.lower() in {"k", "kg", "kindergarten", "0"}:
        return "KG"
    try:
        f = float(v)
        if f.is_integer():
            return str(int(f))
    except ValueError:
        pass
    return v


@dataclass
class Split:
    """One split's metadata (train has labels, test may have test_labels.csv)."""
    meta: pd.DataFrame          # filename, task, expected_text, grade (+ score when known)
    audio_dir: Path

    @property
    def has_labels(self) -> bool:
        return "score" in self.meta.columns


def _attach_labels(meta: pd.DataFrame, labels_path: Path, meta_path: Path, strict: bool = True) -> pd.DataFrame:
    """meta with a `score` column from the labels file. `strict` (training labels): any problem is an
    error. Otherwise (test_labels.csv, read only to report a test log loss) a problem costs only its
    rows: they are named in a warning and left unlabelled (NaN), never the inference."""
    labels = read_csv(labels_path, LABEL_COLUMNS)
    problems = []
    dup = labels["filename"].duplicated(keep=False)
    if dup.any():
        problems.append(f"{labels_path}: duplicate filenames at {_show_rows(labels, dup, 'filename')}")
    bad = ~labels["score"].str.strip().isin(["0", "1", "0.0", "1.0"])
    if bad.any():
        problems.append(f"{labels_path}: score must be 0 or 1 at {_show_rows(labels, bad, 'score')}")
    unlabeled = ~meta["filename"].isin(labels["filename"])
    if unlabeled.any():
        problems.append(f"{meta_path}: no label in {labels_path.name} for "
                        f"{_show_rows(meta, unlabeled, 'filename')}")
    if problems and strict:
        raise DataError("\n".join(problems))
    if problems:
        logging.getLogger("readaloud.data").warning("%s; those rows count in no test log loss", "; ".join(problems))
    usable = labels[~dup & ~bad]
    score = usable.set_index("filename")["score"].astype(float)
    meta = meta.copy()
    meta["score"] = meta["filename"].map(score)
    if strict:
        meta["score"] = meta["score"].astype(int)
    return meta


def _read_metadata(data_dir: Path, split: str) -> tuple[pd.DataFrame, Path]:
    meta_path = data_dir / f"{split}_metadata.csv"
    meta = read_csv(meta_path, META_COLUMNS)
    for col in META_COLUMNS:
        meta[col] = meta[col].astype(str)
    meta["task"] = meta["task"].str.strip()
    meta["grade"] = meta["grade"].map(normalise_grade)
    meta["expected_text"] = meta["expected_text"].str.strip()
    return meta, meta_path


def _labelled(data_dir: Path, split: str, meta: pd.DataFrame, meta_path: Path) -> pd.DataFrame:
    odd = ~meta["grade"].isin(KNOWN_GRADES)
    if odd.any():  # accepted (every value seen in training becomes a category), but worth a look
        logging.getLogger("readaloud.data").warning(
            "%s: grade outside %s at %s", meta_path, KNOWN_GRADES, _show_rows(meta, odd, "grade"))
    labels_path = data_dir / ("train_labels.csv" if split == "train" else "test_labels.csv")
    if split == "train" or labels_path.exists():
        meta = _attach_labels(meta, labels_path, meta_path, strict=split == "train")
    return meta


def load_split(data_dir: str | Path, split: str, check_audio: bool = True) -> Split:
    """Load `train` (metadata + labels) or `test` (metadata, + test_labels.csv when present)."""
    data_dir = Path(data_dir)
    meta, meta_path = _read_metadata(data_dir, split)
    problems = check_metadata(meta, meta_path, data_dir if check_audio else None)
    if problems:
        raise DataError("\n".join(problems))
    return Split(meta=_labelled(data_dir, split, meta, meta_path), audio_dir=data_dir)


def load_test_rows(data_dir: str | Path) -> tuple[Split, dict[str, str]]:
    """The test metadata for inference, where one bad row must not cost the others: a row with
    a problem of its own (empty expected_text or task, a filename listed twice) is left out and
    returned as {filename: why}; a problem of the whole file (missing, unparsable, a column
    missing) still raises."""
    data_dir = Path(data_dir)
    meta, meta_path = _read_metadata(data_dir, "test")
    meta["line"] = meta.index + 2   # the row's line in the file, for warnings that name it
    bad_rows = pd.Series(False, index=meta.index)
    problems: dict[str, str] = {}
    for mask, what in _row_checks(meta):
        for name in meta.loc[mask, "filename"]:
            problems.setdefault(name, f"{what} in {meta_path.name}")
        bad_rows |= mask
    meta = meta[~bad_rows].reset_index(drop=True)
    return Split(meta=_labelled(data_dir, "test", meta, meta_path), audio_dir=data_dir), problems


def load_submission_format(data_dir: str | Path) -> pd.DataFrame:
    path = Path(data_dir) / "submission_format.csv"
    df = read_csv(path, LABEL_COLUMNS)
    dup = df["filename"].duplicated(keep=False)
    if dup.any():
        raise DataError(f"{path}: duplicate filenames at {_show_rows(df, dup, 'filename')}")
    return df
