"""Zero-shot probe: how far pretrained Whisper's ASR evidence alone gets, with no fine-tuning.

    python -m readaloud.bench.zero_shot --data DIR --backbones whisper-tiny.en,whisper-base

DIR is a screening set in the competition layout with its answers kept back (train_metadata.csv,
train_labels.csv, test_metadata.csv, test_labels.csv; `../shared/bench/read_aloud_set.py` and
`digit_span.py` write one, with held-out speakers in the test part). For each backbone the ASR
evidence of every clip (`readaloud.members.gbm.evidence`, cached in DIR/cache) goes to two small
classifiers fitted on the training part: a gradient-boosted model (scikit-learn's
HistGradientBoostingClassifier, 6-leaf trees, at least 30 clips a leaf) and a logistic regression
(median-imputed, standardised). With several backbones their features are also joined. Test log
loss, AUC and the training base rate's log loss go to <out>/zero_shot.md and zero_shot.json,
with the log loss per change type when DIR/speakers.csv names one (read_aloud_set.py: own, swap,
drop, add, other) and how often the transcript equals the expected text where the answer is yes.
"""
from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from . import write_report
from ..metrics import log_loss
from ..members.gbm.evidence import FEATURE_NAMES, AsrSettings, WhisperEvidence, asr_cache_path, asr_table

SEED = 0


def read_split(data: Path, part: str) -> pd.DataFrame:
    """<part>_metadata.csv joined with <part>_labels.csv (filename, expected_text, score, ...)."""
    meta_path, labels_path = data / f"{part}_metadata.csv", data / f"{part}_labels.csv"
    for path in (meta_path, labels_path):
        if not path.exists():
            raise SystemExit(f"{path} not found: --data needs a set with {part}_metadata.csv and {part}_labels.csv")
    meta = pd.read_csv(meta_path, dtype={"filename": str, "grade": str})
    labels = pd.read_csv(labels_path, dtype={"filename": str})
    df = meta.merge(labels[["filename", "score"]], on="filename", how="left", validate="one_to_one")
    if df["score"].isna().any():
        missing = df.loc[df["score"].isna(), "filename"].iloc[0]
        raise SystemExit(f"{labels_path}: no score for {missing} (and {int(df['score'].isna().sum()) - 1} more)")
    speakers = data / "speakers.csv"
    if speakers.exists():
        info = pd.read_csv(speakers, dtype=str)
        if "change" in info.columns:
            df = df.merge(info[["filename", "change"]], on="filename", how="left")
    return df


def classifiers() -> dict:
    return {
        "gbm": lambda: HistGradientBoostingClassifier(max_leaf_nodes=6, min_samples_leaf=30, learning_rate=0.05,
                                                      max_iter=150, l2_regularization=1.0, random_state=SEED),
        "logreg": lambda: make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                                        LogisticRegression(C=1.0, max_iter=2000)),
    }


def swap_localisation(data: Path, df: pd.DataFrame, words: list[list[tuple[str, float]]]) -> dict | None:
    """On rows whose sentence had one word swapped ("swap" in speakers.csv) and whose audio also
    appears with its own sentence ("own"), how often the least likely expected word is the swapped one."""
    if "change" not in df.columns:
        return None
    digest = {name: hashlib.sha1((data / name).read_bytes()).hexdigest()
              for name in df["filename"][df["change"].isin(["own", "swap"])] if (data / name).exists()}
    own_text = {digest[n]: t for n, t, c in zip(df["filename"], df["expected_text"], df["change"])
                if c == "own" and n in digest}
    hits = total = 0
    for row, (name, text, change) in enumerate(zip(df["filename"], df["expected_text"], df["change"])):
        original = own_text.get(digest.get(name, ""))
        if change != "swap" or original is None or not words[row]:
            continue
        said, asked = original.split(), str(text).split()
        differing = [k for k, (a, b) in enumerate(zip(said, asked)) if a != b] if len(said) == len(asked) else []
        if not differing:
            continue
        total += 1
        hits += int(np.argmin([lp for _, lp in words[row]]) in differing)
    return {"rows": total, "least_likely_is_swapped": hits / total if total else None}


def evidence(data: Path, df: pd.DataFrame, backbone: str, settings: AsrSettings, args) -> tuple[np.ndarray, dict]:
    """The backbone's feature table for `df` (cached) and how long computing it took."""
    model = WhisperEvidence(backbone, device=args.device, compute_type=args.compute_type, threads=args.threads,
                            settings=settings)
    start = time.perf_counter()
    table = asr_table(df, data, model, asr_cache_path(data, model), batch_size=args.batch_size or None)
    seconds = time.perf_counter() - start
    if not table.ok.all():
        bad = df["filename"][~table.ok].tolist()
        print(f"  {len(bad)} rows without evidence (e.g. {bad[0]}): their features are missing (NaN)")
    positives = df["score"].to_numpy() == 1
    exact = table.X[:, FEATURE_NAMES.index("exact_match")]
    info = {"seconds": round(seconds, 1), "rows": len(df), "identity": model.identity,
            "exact_match_when_correct": float(np.nanmean(exact[positives])) if positives.any() else None,
            "swap_localisation": swap_localisation(data, df, table.words)}
    return table.X, info


def score(y: np.ndarray, p: np.ndarray, df: pd.DataFrame) -> dict:
    out = {"logloss": log_loss(y, p), "auc": float(roc_auc_score(y, p)) if len(set(y)) > 1 else None}
    if "change" in df.columns:
        out["by_change"] = {str(c): log_loss(y[m], p[m]) for c, m in
                            ((c, (df["change"] == c).to_numpy()) for c in sorted(df["change"].dropna().unique()))}
    return out


def probe(train: pd.DataFrame, test: pd.DataFrame, X_train: np.ndarray, X_test: np.ndarray) -> dict:
    y_train, y_test = train["score"].to_numpy(int), test["score"].to_numpy(int)
    results = {}
    for name, make in classifiers().items():
        model = make().fit(X_train, y_train)
        results[name] = score(y_test, model.predict_proba(X_test)[:, 1], test)
    return results


def markdown(report: dict) -> str:
    lines = [f"# Zero-shot ASR evidence on {report['data']}", "",
             f"{report['n_train']} training rows, {report['n_test']} test rows; window {report['window_s']} s, "
             f"{report['threads']} threads (0: all), compute type {report['compute_type']}. "
             "Test log loss (AUC); prior = the training base rate.", ""]
    changes = sorted({c for r in report["results"].values() for m in r.values() for c in m.get("by_change", {})})
    head = "| features | classifier | test log loss | AUC |" + "".join(f" {c} |" for c in changes)
    lines += [head, "|" + " --- |" * (4 + len(changes))]
    prior = report["prior"]
    lines.append(f"| prior | | {prior['logloss']:.4f} | |" + "".join(
        f" {prior.get('by_change', {}).get(c, float('nan')):.3f} |" for c in changes))
    for features, by_model in report["results"].items():
        for name, r in by_model.items():
            auc = f"{r['auc']:.3f}" if r["auc"] is not None else ""
            lines.append(f"| {features} | {name} | {r['logloss']:.4f} | {auc} |" + "".join(
                f" {r.get('by_change', {}).get(c, float('nan')):.3f} |" for c in changes))
    lines += ["", "| backbone | transcript = expected text (test rows scored 1) | least likely word is the "
              "swapped one (test swap rows) | evidence time (s, all rows; ~0 when cached) |",
              "| --- | --- | --- | --- |"]
    for backbone, info in report["backbones"].items():
        match = info["test"]["exact_match_when_correct"]
        swap = info["test"]["swap_localisation"] or {}
        located = f"{swap['least_likely_is_swapped']:.3f} of {swap['rows']}" if swap.get("rows") else "n/a"
        lines.append(f"| {backbone} | {match:.3f} | {located} | "
                     f"{info['train']['seconds'] + info['test']['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a set with train/test metadata and labels")
    p.add_argument("--backbones", default="whisper-tiny.en,whisper-base",
                   help="comma-separated named backbones or CTranslate2 Whisper folders")
    p.add_argument("--out", default=None, help="report folder (default: <data>/zero_shot)")
    p.add_argument("--window_s", type=float, default=AsrSettings.window_s)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: every core this process may use)")
    p.add_argument("--batch_size", type=int, default=0, help="clips per encoder call (0: 1 on CPU, 16 on CUDA)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--compute_type", default="auto", help="auto (int8 on CPU, float16 on CUDA) or a CTranslate2 type")
    args = p.parse_args(argv)
    data = Path(args.data)
    out = Path(args.out) if args.out else data / "zero_shot"
    train, test = read_split(data, "train"), read_split(data, "test")
    settings = AsrSettings(window_s=args.window_s)
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    tables, infos = {}, {}
    for backbone in backbones:
        print(f"{backbone}: ASR evidence for {len(train)} training and {len(test)} test rows", flush=True)
        X_train, info_train = evidence(data, train, backbone, settings, args)
        X_test, info_test = evidence(data, test, backbone, settings, args)
        tables[backbone] = (X_train, X_test)
        infos[backbone] = {"train": info_train, "test": info_test}
    feature_sets = {b: tables[b] for b in backbones}
    if len(backbones) > 1:
        feature_sets[" + ".join(backbones)] = (np.hstack([tables[b][0] for b in backbones]),
                                               np.hstack([tables[b][1] for b in backbones]))
    base_rate = float(train["score"].mean())
    report = {"data": str(data), "n_train": len(train), "n_test": len(test), "window_s": args.window_s,
              "threads": args.threads, "compute_type": args.compute_type, "backbones": infos,
              "prior": score(test["score"].to_numpy(int), np.full(len(test), base_rate), test),
              "results": {name: probe(train, test, *X) for name, X in feature_sets.items()}}
    return write_report(out, "zero_shot", report, markdown(report))


if __name__ == "__main__":
    main()
