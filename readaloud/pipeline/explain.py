"""Per-word evidence for teachers (`infer.py --explain`): for each test row, how likely a pretrained
Whisper finds each expected word in the clip, what it heard, and the word it rates least likely
(the challenge's explainability track: which word was missed).

The numbers are the ASR evidence of members/gbm/evidence.py (teacher-forced log p of the expected text,
summed per word). They come from the ear that hears the children best among the shipped members:
model6asr's fold ear (members/gbm/fold_ears.py, the Whisper decoder adapted to the training voices) where
it reads one, else the first ASR backbone of a gbm member with `gbm_features` including asr, else
whisper-tiny.en. Either way they are read from the data folder's caches, which inference has just
filled when such a member is shipped, so explaining costs no second decode. A row that cannot be explained (no metadata, an empty expected text, an unreadable clip)
gets a row with a note, never an error.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd

from ..checkpoints import atomic_csv, atomic_write, safe_load
from ..config import RunConfig
from ..data import load_submission_format, load_test_rows
from ..layout import summary_beside
from ..members.gbm.fold_ears import published_dir, published_ear_table
from ..members.gbm.gbm import asr_device, asr_evidence
from ..members.pair.neural import pick_device
from ..members.registry import member_for
from ..whisper.adapt import ear_recipe, is_ear
from .inference import ensemble_members

log = logging.getLogger("readaloud.infer")

DEFAULT_BACKBONE = "whisper-tiny.en"
CSV_COLUMNS = ("filename", "task", "expected_text", "score", "transcript", "least_likely_word", "least_likely_p",
               "least_likely_index", "word_probs", "backbone", "note")


def explain_path(submission: str | Path) -> Path:
    """submission.csv -> submission_explain.csv beside it."""
    submission = Path(submission)
    return submission.with_name(f"{submission.stem}_explain.csv")


def explain_backbone(assets_dir: str | Path) -> str:
    """The published fold ear of a shipped member that reads one (its folder, <assets>/ears/<key>),
    else the first ASR backbone of the shipped members (read from each member's first fold summary),
    else whisper-tiny.en."""
    assets_dir = Path(assets_dir)
    members, _, _ = ensemble_members(assets_dir, None)
    backbones = []
    for member in members:
        for checkpoint in member.get("checkpoints", [])[:1]:
            try:
                cfg = RunConfig.from_dict(json.loads(summary_beside(assets_dir / checkpoint).read_text())["config"])
                own = member_for(cfg).asr_backbones(cfg)
                backbones += own
                ear = published_dir(assets_dir, str(safe_load(assets_dir / checkpoint)["fold_ear"])) \
                    if cfg.model.asr_fold_ears and own else None
            except Exception as exc:  # an unreadable summary costs this member's say, nothing more
                log.warning("explain: cannot read the config of %s (%s)", checkpoint, exc)
                continue
            if ear is not None and is_ear(ear):
                return str(ear)
    return backbones[0] if backbones else DEFAULT_BACKBONE


def evidence_label(backbone: str) -> str:
    """What the explanations name as their ear: a backbone's name, or a fold ear's recipe and key."""
    folder = Path(backbone)
    if not is_ear(folder):
        return backbone
    return f"fold ear {folder.name} ({ear_recipe(folder).backbone} adapted to the training voices)"


def explain_rows(data_dir: str | Path, backbone: str, scores: dict[str, float] | None = None,
                 device: str = "auto", progress: bool = True) -> list[dict]:
    """One record per submission row, in its order."""
    data_dir = Path(data_dir)
    fmt = load_submission_format(data_dir)
    test, problems = load_test_rows(data_dir)
    meta = fmt[["filename"]].merge(test.meta[["filename", "task", "expected_text"]], on="filename", how="left")
    meta[["task", "expected_text"]] = meta[["task", "expected_text"]].fillna("")
    has_text = (meta["expected_text"].str.strip() != "").to_numpy()
    rows = meta[has_text]
    device = asr_device(pick_device(device))
    # a fold ear reads the frozen encoder's cached output (the cache inference filled), as model6asr reads it
    table = published_ear_table(ear_recipe(Path(backbone)), Path(backbone), rows, data_dir, device, progress) \
        if is_ear(Path(backbone)) else asr_evidence(backbone, rows, data_dir, device, 0, progress)
    evidence = {i: k for k, i in enumerate(rows.index)}
    listed = set(test.meta["filename"])
    label = evidence_label(backbone)
    records = []
    for i, (name, task, text) in enumerate(zip(meta["filename"], meta["task"], meta["expected_text"])):
        record = {"filename": name, "task": task, "expected_text": text,
                  "score": (scores or {}).get(name), "transcript": "", "words": [],
                  "least_likely_word": "", "least_likely_p": None, "least_likely_index": None,
                  "backbone": label, "note": ""}
        k = evidence.get(i)
        if k is None:
            missing = "empty expected_text" if name in listed else "no row in test_metadata.csv"
            record["note"] = problems.get(name, missing)
        elif not table.ok[k]:
            record["note"] = "no ASR evidence (the clip could not be read)"
        else:
            words = [{"word": w, "p": float(f"{math.exp(lp):.4g}"), "logp": round(lp, 3)}
                     for w, lp in table.words[k]]
            record["transcript"], record["words"] = table.transcripts[k], words
            if words:
                low = min(range(len(words)), key=lambda j: table.words[k][j][1])
                record |= {"least_likely_word": words[low]["word"], "least_likely_p": words[low]["p"],
                           "least_likely_index": low}
        records.append(record)
    return records


def write_explanations(data_dir: str | Path, assets_dir: str | Path, out: str | Path,
                       submission: str | Path | None = None, device: str = "auto", backbone: str | None = None,
                       progress: bool = True) -> dict:
    """Explain every submission row into `out` (.jsonl: one JSON object a row; else CSV with the
    words as a JSON list in `word_probs`), written atomically. Returns what was written."""
    out = Path(out)
    backbone = backbone or explain_backbone(assets_dir)
    scores = None
    if submission is not None and Path(submission).exists():
        sub = pd.read_csv(submission, dtype={"filename": str})
        scores = dict(zip(sub["filename"], sub["score"].astype(float)))
    records = explain_rows(data_dir, backbone, scores, device, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() in (".jsonl", ".json"):
        atomic_write(out, "".join(json.dumps(r) + "\n" for r in records))
    else:
        table = pd.DataFrame([{**{k: r[k] for k in CSV_COLUMNS if k in r}, "word_probs": json.dumps(r["words"])}
                              for r in records], columns=list(CSV_COLUMNS))
        atomic_csv(table, out)
    explained = sum(bool(r["words"]) for r in records)
    label = evidence_label(backbone)
    log.info("explain: %d of %d rows explained with %s -> %s", explained, len(records), label, out)
    return {"explain": str(out), "rows": len(records), "explained": explained, "backbone": label}
