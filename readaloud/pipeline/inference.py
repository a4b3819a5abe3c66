"""Offline ensemble inference: test clips -> submission.csv, always.

Features and TTS references are computed once and shared by every checkpoint (members.base.
TestInputs). Everything degrades per row, never per file: a row with a problem of its own
(no metadata, an empty expected text or task, a clip that cannot be decoded) gets its task's
training prior and is named, while every other row gets the models' predictions; a task or
grade never seen in training is predicted with the model's "unknown" value, with a warning. A
checkpoint that is missing or broken is dropped and the weights renormalised. The submission
has exactly the submission format's rows, in its order, with probabilities strictly inside (0, 1).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..checkpoints import CHECKPOINT_FOLDER, CheckpointError, atomic_csv, safe_load
from ..data import DataError, load_split, load_submission_format, load_test_rows
from ..features import FeatureParams
from ..layout import retrain_command, saved_folds, summary_beside
from ..members.base import Predictor, TestInputs
from ..members.pair.neural import pick_device
from ..members.registry import member_named
from ..metrics import clip_prob, log_loss, prior_predictions, sigmoid, task_priors
from ..prep.dataset import Categories
from ..prep.prepare import ensure_clip_features
from .ensemble import read_config

log = logging.getLogger("readaloud.infer")


@dataclass
class FoldModel:
    """A loaded checkpoint of one (variant, fold), whatever its family."""
    name: str
    fold: int
    predictor: Predictor

    @property
    def model(self):
        return self.predictor.model

    @property
    def cats(self) -> Categories:
        return self.predictor.cats


def _fix_for(path: Path, n_folds: int | None) -> str:
    """How to repair a checkpoint, from what its fold's summary says the fold is."""
    try:
        info = json.loads(summary_beside(path).read_text())
        variant, fold = info["variant"], int(info["fold"])
    except (OSError, ValueError, KeyError, TypeError):
        return "retrain its fold (see check_models.py), or drop it from the ensemble"
    command = retrain_command(variant, fold, info.get("n_folds", n_folds or "K"), "data", "assets", "--force")
    return f"retrain it: {command} (see check_models.py), or drop it from the ensemble"


def load_fold_model(path: str | Path, device, n_folds: int | None = None) -> FoldModel:
    """A fold checkpoint, loaded by its family (the checkpoint's `arch`, else its config's)."""
    path = Path(path)
    ck = safe_load(path, map_location="cpu", fix=_fix_for(path, n_folds))
    try:
        arch = ck.get("arch") or json.loads(ck["config"])["model"]["arch"]
        ck[CHECKPOINT_FOLDER] = str(path.parent)   # what a checkpoint keeps beside itself (a gbm fold's ear)
        return FoldModel(ck["variant"], int(ck["fold"]), member_named(arch).load(ck, device))
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # CheckpointError, ConfigError among them
        raise CheckpointError(f"{path}: not a usable readaloud checkpoint ({exc})") from exc


def test_inputs(data_dir: Path, tts_dir, fmt: pd.DataFrame, device, progress: bool
                ) -> tuple[TestInputs, pd.DataFrame, dict[str, str]]:
    """The submission's rows with their metadata, and {filename: why} of the rows no model can
    predict: no metadata, a problem in its metadata row, a clip that cannot be decoded."""
    test, problems = load_test_rows(data_dir)
    meta = fmt[["filename"]].merge(test.meta, on="filename", how="left")
    for name in meta.loc[meta["task"].isna() & ~meta["filename"].isin(problems), "filename"]:
        problems[name] = "no row in test_metadata.csv"
    meta[["task", "grade", "expected_text"]] = meta[["task", "grade", "expected_text"]].fillna("")
    listed = meta.loc[~meta["filename"].isin(problems), "filename"].tolist()
    _, bad = ensure_clip_features(data_dir, listed, FeatureParams(), progress=progress)
    for name, why in bad.items():
        problems[name] = f"clip cannot be decoded ({why})"
    usable = ~meta["filename"].isin(problems).to_numpy()
    problems = {f: problems[f] for f in meta["filename"] if f in problems}  # the rows of the submission only
    if problems:
        shown = "; ".join(f"{f}: {why}" for f, why in list(problems.items())[:20])
        log.warning("%d test rows get their task's prior instead of a prediction: %s%s", len(problems), shown,
                    f" (+{len(problems) - 20} more)" if len(problems) > 20 else "")
    return TestInputs(meta, usable, data_dir, Path(tts_dir), device, progress), test.meta, problems


def _warn_unseen(meta: pd.DataFrame, cats: Categories, source: str = "test_metadata.csv") -> None:
    """One warning per column naming each row (file, line of `source`, value) whose value training never saw."""
    for col, known in (("task", cats.tasks), ("grade", cats.grades)):
        unseen = ~meta[col].isin(set(known))
        if unseen.any():
            rows = [f"row {int(line)} ({name}): {col}={value!r}" for name, line, value in
                    zip(meta.loc[unseen, "filename"], meta.loc[unseen, "line"], meta.loc[unseen, col])]
            log.warning("%d row(s) of %s have a %s not seen in training and use the model's 'unknown' %s: %s%s",
                        len(rows), source, col, col, "; ".join(rows[:20]),
                        f" (+{len(rows) - 20} more)" if len(rows) > 20 else "")


@dataclass
class Predictions:
    """Each model's logits per shipped checkpoint (rows of the submission; NaN = not predicted)."""
    logits: dict[str, list[np.ndarray]] = field(default_factory=dict)
    priors: list[dict] = field(default_factory=list)
    listed: int = 0


def predict_checkpoints(members: list[dict], inputs: TestInputs, assets_dir: Path, n_folds: int | None,
                        time_limit: float | None, start: float) -> Predictions:
    """Every listed checkpoint that loads and predicts; a broken one is dropped and named."""
    preds = Predictions()
    checkpoints = [(m["model"], c) for m in members for c in m["checkpoints"]]
    preds.listed = len(checkpoints)
    per_ckpt = None
    for i, (name, ck_name) in enumerate(checkpoints):
        if time_limit and per_ckpt and time.time() - start + 1.5 * per_ckpt > 0.9 * time_limit:
            log.warning("time limit: stopping after %d of %d checkpoints", i, len(checkpoints))
            break
        t0 = time.time()
        try:
            fm = load_fold_model(assets_dir / ck_name, inputs.device, n_folds)
        except Exception as exc:  # CheckpointError, or anything else a damaged file provokes
            log.warning("dropping %s: %s", ck_name, exc)
            continue
        if not preds.priors:  # the first model that loads: say which values it has never seen
            _warn_unseen(inputs.rows, fm.cats)
        try:
            logits = fm.predictor.predict(inputs)
        except Exception as exc:  # a failing model must not cost the submission
            log.warning("dropping %s: prediction failed (%s: %s)", ck_name, type(exc).__name__, exc)
            continue
        preds.logits.setdefault(name, []).append(logits)
        preds.priors.append(fm.predictor.priors)
        per_ckpt = time.time() - t0
        log.info("%s: %d clips in %.1fs", ck_name, int(np.isfinite(logits).sum()), per_ckpt)
    return preds


def blend(preds: Predictions, members: list[dict], bias: float, fallback: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(probabilities, rows left to the fallback, each model's mean logit): the weighted logits
    of the models that ran, renormalised over them; a row some model could not predict keeps
    its fallback."""
    weights = {m["model"]: float(m["weight"]) for m in members if m["model"] in preds.logits}
    if not preds.logits:
        return fallback.copy(), np.ones(len(fallback), bool), {}
    total_w = sum(weights.values())  # a weight of 0 is a bias-only blend, still a model's
    full_w = sum(float(m["weight"]) for m in members)
    scale = full_w / total_w if total_w > 0 else 1.0  # renormalise over the models that ran
    z = np.zeros(len(fallback))
    have = np.ones(len(fallback), bool)
    per_model = {}
    for name, w in weights.items():
        mean_logit = np.nanmean(np.stack(preds.logits[name]), axis=0)
        per_model[name] = mean_logit
        have &= np.isfinite(mean_logit)
        z += w * scale * np.nan_to_num(mean_logit)
    return np.where(have, sigmoid(z + bias), fallback), ~have, per_model


def ensemble_members(assets_dir: Path, config: dict | None) -> tuple[list[dict], float, int | None]:
    """(members, bias, n_folds) of the ensemble config, or equal weights over every finished fold."""
    try:
        config = config if config is not None else read_config(assets_dir)
        return config["members"], float(config.get("bias", 0.0)), config.get("n_folds")
    except FileNotFoundError:
        groups: dict[str, list[str]] = {}
        for paths in sorted(saved_folds(assets_dir), key=lambda p: (p.variant, p.fold)):
            if paths.checkpoint.exists():
                groups.setdefault(paths.variant, []).append(paths.checkpoint.name)
        members = [{"model": m, "weight": 1.0 / len(groups), "checkpoints": c} for m, c in groups.items()]
        log.warning("no model_configs.json in %s: equal weights over %d finished models", assets_dir, len(members))
        return members, 0.0, None


def run_inference(data_dir: str | Path = "data", assets_dir: str | Path = "assets",
                  tts_dir: str | Path = "tts_data", out: str | Path = "submission.csv",
                  device: str = "auto", time_limit: float | None = None, progress: bool = True,
                  config: dict | None = None, rows: list[str] | None = None) -> dict:
    """Predict the test set with the ensemble in assets/model_configs.json (or `config`); write `out`.
    `rows`: only these filenames of the submission format, in its order (a shard of infer.py --ray)."""
    start = time.time()
    data_dir, assets_dir = Path(data_dir), Path(assets_dir)
    fmt = load_submission_format(data_dir)
    if rows is not None:
        fmt = fmt[fmt["filename"].isin(set(rows))].reset_index(drop=True)
    inputs, test_meta, problems = test_inputs(data_dir, tts_dir, fmt, pick_device(device), progress)
    members, bias, n_folds = ensemble_members(assets_dir, config)
    preds = predict_checkpoints(members, inputs, assets_dir, n_folds, time_limit, start)
    meta = inputs.meta
    priors = _mean_priors(preds.priors) or _train_priors(data_dir)
    fallback = prior_predictions(priors, meta["task"]) if priors else np.full(len(meta), 0.5)
    final, used_fallback, per_model = blend(preds, members, bias, fallback)
    sub = pd.DataFrame({"filename": fmt["filename"], "score": clip_prob(final)})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_csv(sub, out)
    reasons = {f: problems.get(f, "no model could predict it") for f in meta.loc[used_fallback, "filename"]}
    result = {"submission": str(out), "rows": len(sub), "models_used": sorted(per_model),
              "checkpoints_used": sum(len(v) for v in preds.logits.values()), "checkpoints_listed": preds.listed,
              "fallback_rows": int(used_fallback.sum()), "fallback": reasons, "seconds": time.time() - start,
              # each model's own probability per submission row (its folds' mean logit), None where it had none
              "per_model": {m: [float(p) if np.isfinite(z) else None for z, p in zip(v, sigmoid(np.nan_to_num(v)))]
                            for m, v in per_model.items()}}
    if "score" in test_meta.columns:
        y = meta["score"].to_numpy(dtype=float)
        ok = np.isfinite(y)
        result["test_logloss"] = log_loss(y[ok], sub["score"].to_numpy()[ok])
        result["test_logloss_prior"] = log_loss(y[ok], fallback[ok])
        result["test_logloss_single"] = {m: log_loss(y[ok], sigmoid(np.nan_to_num(v))[ok])
                                         for m, v in per_model.items()}
    if not preds.logits:
        result["error"] = "no model could make a prediction: the submission holds priors only"
    return result


def _mean_priors(priors: list[dict]) -> dict:
    if not priors:
        return {}
    keys = set().union(*priors)
    return {k: float(np.mean([p[k] for p in priors if k in p])) for k in keys}


def _train_priors(data_dir: Path) -> dict:
    try:
        return task_priors(load_split(data_dir, "train", check_audio=False).meta)
    except (DataError, OSError, KeyError):
        return {}


def write_fallback_submission(data_dir: str | Path, assets_dir: str | Path, out: str | Path) -> int:
    """Last resort when inference itself failed: the submission format's rows with task priors
    (from any readable checkpoint, else the training labels, else 0.5). Returns the row count."""
    data_dir, assets_dir = Path(data_dir), Path(assets_dir)
    fmt = load_submission_format(data_dir)
    priors: dict = {}
    for paths in saved_folds(assets_dir):
        try:
            priors = json.loads(safe_load(paths.checkpoint)["priors"])
            break
        except Exception:
            continue
    priors = priors or _train_priors(data_dir)
    tasks = [""] * len(fmt)
    try:
        test = load_split(data_dir, "test", check_audio=False).meta.set_index("filename")["task"]
        tasks = [test.get(f, "") for f in fmt["filename"]]
    except Exception:
        pass
    values = prior_predictions(priors, tasks) if priors else np.full(len(fmt), 0.5)
    sub = pd.DataFrame({"filename": fmt["filename"], "score": clip_prob(values)})
    atomic_csv(sub, out)
    return len(sub)
