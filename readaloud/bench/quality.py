"""Quality benchmark: the whole pipeline on a labelled data folder, scored per task and grade.

    python -m readaloud.bench.quality --data DIR [--out DIR] [--models a,b] [--n_folds 6]
                                      [--epochs E] [--jobs 2] [--backbone PATH | --pretrain]
                                      [--fold_by stratified|voice | --groups FILE]

Runs preprocess -> (pretrain) -> train.py -> get_config -> inference on any folder in the
competition layout that has test_labels.csv, then reports test log loss overall, per task and
per grade for the prior, every model (all its folds, alone) and the ensemble. Writes
summary.md, summary.json and PNGs (reliability diagram, CV log loss per fold, per-task losses)
into --out. Finished folds are reused, so a rerun only scores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> float:
    """Run a project script in the repo root; returns its wall seconds."""
    cmd = [sys.executable, *args]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return time.time() - t0


def scores(y: np.ndarray, p: np.ndarray) -> dict:
    """Clips, log loss and AUC (None when only one class is present) of predictions `p`."""
    from sklearn.metrics import roc_auc_score
    from readaloud.metrics import clip_prob, log_loss
    y, p = np.asarray(y, float), np.asarray(p, float)
    auc = float(roc_auc_score(y, clip_prob(p))) if len(np.unique(y)) > 1 else None
    return {"n": int(len(y)), "logloss": log_loss(y, p), "auc": auc}


def metrics_by(y: np.ndarray, p: np.ndarray, labels) -> dict[str, dict]:
    """scores() for each value of `labels` (any per-clip column: task, grade, change type, speaker)."""
    labels = pd.Series(np.asarray(labels)).astype(str)
    y, p = np.asarray(y, float), np.asarray(p, float)
    return {value: scores(y[(labels == value).to_numpy()], p[(labels == value).to_numpy()])
            for value in sorted(labels.unique())}


def decomposition_lines(parts: dict[str, dict[str, float]]) -> list[str]:
    """Markdown for {predictor: metrics.log_loss_decomposition(...)}: how much of each test log loss a
    perfect recalibration would remove, and what it would leave."""
    lines = ["Test log loss = miscalibration - discrimination + uncertainty (CORP decomposition; "
             "*recalibrated*: after the best monotone map fitted on these test labels themselves, "
             "a floor for any calibration, not a method):\n",
             "| | log loss | miscalibration | discrimination | uncertainty | recalibrated |", "|---" * 6 + "|"]
    keys = ("logloss", "miscalibration", "discrimination", "uncertainty", "recalibrated")
    lines += [f"| {name} | " + " | ".join(f"{d[k]:.4f}" for k in keys) + " |" for name, d in parts.items()]
    return lines


def breakdown(y: np.ndarray, p: np.ndarray, meta: pd.DataFrame, columns=("task", "grade")) -> dict:
    """Log loss overall and per value of each column, flat: {"overall", "task=...", "grade=..."}."""
    from readaloud.metrics import log_loss
    out = {"overall": log_loss(y, p)}
    for col in columns:
        out |= {f"{col}={value}": s["logloss"] for value, s in metrics_by(y, p, meta[col]).items()}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)  # "--tts" passes on
    p.add_argument("--data", required=True)
    p.add_argument("--out", default=None, help="report folder (default: <data>_quality)")
    p.add_argument("--assets", default=None, help="models folder (default: <out>/assets)")
    p.add_argument("--tts_dir", default="tts_data")
    p.add_argument("--models", default=None, help="comma-separated variants, or 'all' (default: the default ensemble)")
    p.add_argument("--n_folds", type=int, default=6)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--backbone", default=None, help="pretrained encoder for every variant")
    p.add_argument("--pretrain", action="store_true", help="run pretrain.py first and use its encoder")
    p.add_argument("--fold_by", choices=("stratified", "voice"), default=None,
                   help="fold scheme for a new data set (preprocess.py --fold_by); voice = unheard voices in OOF")
    p.add_argument("--groups", default=None, metavar="FILE",
                   help="filename,group CSV: folds keep each group (child) whole (preprocess.py --groups)")
    p.add_argument("--fold_seed", type=int, default=None,
                   help="seed of the folds' draw for a new data set (preprocess.py --fold_seed; default 42)")
    args, extra = p.parse_known_args(argv)
    from readaloud.pipeline.checking import check
    from readaloud.data import load_split
    from readaloud.layout import FoldPaths, saved_folds
    from readaloud.pipeline.ensemble import read_config
    from readaloud.pipeline.inference import run_inference
    from readaloud.metrics import log_loss_decomposition, prior_predictions, task_priors
    from readaloud.plots import plot_cv_bars, plot_reliability, plot_task_losses
    from readaloud.variants import resolve_models

    data = Path(args.data).resolve()  # the steps run in the repo root: paths as the caller meant them
    args.tts_dir = str(Path(args.tts_dir).resolve())
    if not (data / "test_labels.csv").exists():
        raise SystemExit(f"{data}/test_labels.csv not found: the quality benchmark needs test labels")
    out = Path(args.out or f"{str(data).rstrip('/')}_quality").resolve()
    assets = Path(args.assets or out / "assets").resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        models = resolve_models(args.models)
    except KeyError as exc:
        raise SystemExit(exc.args[0])
    common = ["--data", str(data), "--tts_dir", args.tts_dir]
    folds_by = ["--fold_by", args.fold_by] if args.fold_by else []
    folds_by += ["--groups", str(Path(args.groups).resolve())] if args.groups else []
    folds_by += ["--fold_seed", str(args.fold_seed)] if args.fold_seed is not None else []
    seconds = {"preprocess": _run("preprocess.py", *common, "--n_folds", str(args.n_folds), *folds_by)}
    backbone = args.backbone
    if args.pretrain:
        backbone = str(assets / "pretrained_encoder")
        seconds["pretrain"] = _run("pretrain.py", "--out", backbone, "--data", str(data))
    train = ["train.py", *common, "--assets", str(assets), "--models", ",".join(models), "--n_folds",
             str(args.n_folds), "--jobs", str(args.jobs), *extra]
    train += ["--epochs", str(args.epochs)] if args.epochs else []
    train += ["--backbone", backbone] if backbone else []
    seconds["train"] = _run(*train)  # finished folds are skipped: a rerun's is short
    seconds["get_config"] = _run("get_config.py", "--data", str(data), "--assets", str(assets),
                                 "--models", ",".join(models))

    train_meta = load_split(data, "train", check_audio=False).meta
    test = load_split(data, "test", check_audio=False).meta
    fmt = pd.read_csv(data / "submission_format.csv", dtype=str)
    test = fmt[["filename"]].merge(test, on="filename", how="left")
    y = test["score"].to_numpy(float)
    preds = {"prior (base rate)": np.full(len(test), train_meta["score"].mean()),
             "prior (per task)": prior_predictions(task_priors(train_meta), test["task"])}
    trained = [p for p in saved_folds(assets) if p.checkpoint.exists()]
    files = {}  # predictor -> its test predictions (filename, score)
    for m in models:
        folds = sorted(p.fold for p in trained if p.variant == m)
        if not folds:
            continue
        alone = {"members": [{"model": m, "weight": 1.0, "folds": folds,
                              "checkpoints": [FoldPaths(assets, m, f).checkpoint.name for f in folds]}],
                 "bias": 0.0, "n_folds": args.n_folds}
        t0 = time.time()
        res = run_inference(data, assets, args.tts_dir, out / f"test_{m}.csv", progress=False, config=alone)
        seconds[f"inference {m}"] = time.time() - t0
        preds[m] = pd.read_csv(res["submission"])["score"].to_numpy()
        files[m] = str(res["submission"])
    t0 = time.time()
    res = run_inference(data, assets, args.tts_dir, out / "test_ensemble.csv", progress=False)
    seconds["inference ensemble"] = time.time() - t0
    preds["ensemble"] = pd.read_csv(res["submission"])["score"].to_numpy()
    files["ensemble"] = str(res["submission"])

    table = {name: breakdown(y, p, test) for name, p in preds.items()}
    cv, _ = check(assets, models, args.n_folds, data)
    cv_ok = cv[cv.status == "ok"]
    plots = {"reliability": plot_reliability(y, {k: v for k, v in preds.items() if not k.startswith("prior")},
                                             out / "reliability.png"),
             "per_task": plot_task_losses(table, out / "per_task.png")}
    if len(cv_ok):
        plots["cv"] = plot_cv_bars(cv_ok, out / "cv_logloss.png")
    config = read_config(assets)
    cols = list(next(iter(table.values())))
    lines = [f"# Quality benchmark: `{data}`\n",
             f"{len(train_meta)} training clips, {len(test)} test clips; {args.n_folds} folds; models: "
             f"{', '.join(models)}; ensemble OOF log loss {config['oof_logloss']:.4f}\n",
             "Test log loss:\n", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + " |")
    parts = {name: log_loss_decomposition(y, p) for name, p in preds.items() if not name.startswith("prior")}
    lines += ["", *decomposition_lines(parts)]
    lines += ["", *(f"![{k}]({Path(v).name})" for k, v in plots.items())]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    summary = {"data": str(data), "test_logloss": table, "decomposition": parts, "oof_logloss": config["oof_logloss"],
               "plots": {k: str(v) for k, v in plots.items()}, "predictions": files, "assets": str(assets),
               "seconds": seconds}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
