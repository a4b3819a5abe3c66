"""Offline ensemble inference: test clips -> submission.csv, always.

Features and TTS references are computed once and shared by every checkpoint. A checkpoint
that is missing or broken is dropped and the weights renormalised; a clip that cannot be
decoded gets its task's training prior. The submission has exactly the submission format's
rows, in its order, with probabilities strictly inside (0, 1).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .checkpoints import CheckpointError, atomic_csv, safe_load
from .config import RunConfig
from .data import DataError, load_split, load_submission_format
from .dataset import Categories, PairDataset
from .ensemble import read_config
from .features import FeatureParams
from .metrics import clip_prob, log_loss, prior_predictions, sigmoid
from .models import build_model
from .prepare import ensure_clip_features, ensure_references
from .text import Vocab
from .training import pick_device, predict_logits

log = logging.getLogger("readaloud.infer")


@dataclass
class FoldModel:
    name: str
    fold: int
    model: torch.nn.Module
    cfg: RunConfig
    vocab: Vocab
    cats: Categories
    priors: dict
    arch: str = "pair"          # gbm: `model` is a gbm.GBMModel (trees on alignment features), vocab None


def load_fold_model(path: str | Path, device: torch.device, n_folds: int | None = None) -> FoldModel:
    stem = Path(path).stem
    variant, _, fold = stem.rpartition("_")
    fix = (f"retrain it: python train_model{variant.removeprefix('model')}.py --fold {fold} "
           f"--n_folds {n_folds or 'K'} --force (see check_models.py), or drop it from the ensemble")
    ck = safe_load(path, map_location="cpu", fix=fix)
    if ck.get("arch") == "gbm":
        return _load_gbm(path, ck)
    try:
        cfg = RunConfig.from_dict(json.loads(ck["config"]))
        vocab = Vocab.from_dict(json.loads(ck["vocab"]))
        cats = Categories(list(ck["tasks"]), list(ck["grades"]))
        model = build_model(cfg.model, len(cats.tasks), len(cats.grades), len(vocab),
                            whisper_config=json.loads(ck["whisper_config"]))
        model.load_state_dict(ck["state_dict"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a usable readaloud checkpoint ({exc})") from exc
    model.to(device).eval()
    return FoldModel(ck["variant"], int(ck["fold"]), model, cfg, vocab, cats, json.loads(ck["priors"]))


def _load_gbm(path: str | Path, ck: dict) -> FoldModel:
    from .gbm import GBMModel
    try:
        cfg = RunConfig.from_dict(json.loads(ck["config"]))
        cats = Categories(list(ck["tasks"]), list(ck["grades"]))
        model = GBMModel(ck)
        return FoldModel(ck["variant"], int(ck["fold"]), model, cfg, None, cats, json.loads(ck["priors"]), "gbm")
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:  # CheckpointError is a RuntimeError
        raise CheckpointError(f"{path}: not a usable gbm checkpoint ({exc})") from exc


def _warn_unseen(meta: pd.DataFrame, cats: Categories) -> None:
    for col, known in (("task", cats.tasks), ("grade", cats.grades)):
        unseen = sorted(set(meta[col]) - set(known))
        if unseen:
            log.warning("%s value(s) %s not seen in training: those clips use the model's 'unknown' %s",
                        col, unseen, col)


def run_inference(data_dir: str | Path = "data", assets_dir: str | Path = "assets",
                  tts_dir: str | Path = "tts_data", out: str | Path = "submission.csv",
                  device: str = "auto", time_limit: float | None = None, progress: bool = True,
                  config: dict | None = None) -> dict:
    """Predict the test set with the ensemble in assets/model_configs.json (or `config`); write `out`."""
    start = time.time()
    data_dir, assets_dir = Path(data_dir), Path(assets_dir)
    fmt = load_submission_format(data_dir)
    test = load_split(data_dir, "test", check_audio=False)
    meta = fmt[["filename"]].merge(test.meta, on="filename", how="left")
    missing_meta = meta["task"].isna()
    if missing_meta.any():
        log.warning("%d submission rows have no test metadata (e.g. %s): they get the prior",
                    int(missing_meta.sum()), meta.loc[missing_meta, "filename"].iloc[0])
    meta[["task", "grade", "expected_text"]] = meta[["task", "grade", "expected_text"]].fillna("")
    dev = pick_device(device)

    try:
        config = config if config is not None else read_config(assets_dir)
        members = config["members"]
        bias = float(config.get("bias", 0.0))
        n_folds = config.get("n_folds")
    except FileNotFoundError:
        members = _default_members(assets_dir)
        bias, n_folds = 0.0, None
        log.warning("no model_configs.json in %s: equal weights over %d finished models", assets_dir, len(members))

    known = ~missing_meta
    listed = meta.loc[known, "filename"].tolist()
    clips, bad = ensure_clip_features(data_dir, listed, FeatureParams(), progress=progress)
    if bad:
        log.warning("%d test clips could not be decoded: they get their task's prior", len(bad))
    model_logits: dict[str, list[np.ndarray]] = {}
    priors_seen: list[dict] = []
    checkpoints = [(m["model"], c) for m in members for c in m["checkpoints"]]
    per_ckpt = None
    alignment: dict[tuple, tuple] = {}  # gbm models' features, computed once per (tts, n_mels)
    for i, (name, ck_name) in enumerate(checkpoints):
        elapsed = time.time() - start
        if time_limit and per_ckpt and elapsed + 1.5 * per_ckpt > 0.9 * time_limit:
            log.warning("time limit: stopping after %d of %d checkpoints", i, len(checkpoints))
            break
        t0 = time.time()
        try:
            fm = load_fold_model(assets_dir / ck_name, dev, n_folds)
        except Exception as exc:  # CheckpointError, or anything else a damaged file provokes
            log.warning("dropping %s: %s", ck_name, exc)
            continue
        if fm.arch == "gbm":
            try:
                logits = _predict_gbm(fm, meta, known, data_dir, tts_dir, listed, clips, alignment, progress)
            except Exception as exc:  # a failing model must not cost the submission
                log.warning("dropping %s: prediction failed (%s: %s)", ck_name, type(exc).__name__, exc)
                continue
            if not priors_seen:
                _warn_unseen(meta[known], fm.cats)
            model_logits.setdefault(name, []).append(logits)
            priors_seen.append(fm.priors)
            per_ckpt = time.time() - t0
            log.info("%s: %d clips in %.1fs", ck_name, int(np.isfinite(logits).sum()), per_ckpt)
            continue
        params = FeatureParams(n_mels=fm.cfg.model.n_mels)
        if params != FeatureParams():
            clips, _ = ensure_clip_features(data_dir, listed, params, progress=progress)
        refs = ensure_references(tts_dir, fm.cfg.tts, meta.loc[known, "expected_text"].unique(), params,
                                 progress=progress)
        if not priors_seen:  # the first model that loads: say which values it has never seen
            _warn_unseen(meta[known], fm.cats)
        ds = PairDataset(meta[known], clips, refs, fm.vocab, fm.cats, fm.model.max_frames,
                         fm.cfg.model.pause_frames, fm.model.frames_per_position)
        logits = np.full(len(meta), np.nan)
        pos = meta.index[known][meta.loc[known, "filename"].isin(ds.meta["filename"])]
        try:
            pred = predict_logits(fm.model, ds, dev, fm.cfg.data.batch_max_frames, progress=progress)
        except Exception as exc:  # a failing model must not cost the submission
            log.warning("dropping %s: prediction failed (%s: %s)", ck_name, type(exc).__name__, exc)
            continue
        logits[pos] = pred
        model_logits.setdefault(name, []).append(logits)
        priors_seen.append(fm.priors)
        per_ckpt = time.time() - t0
        log.info("%s: %d clips in %.1fs", ck_name, len(ds), per_ckpt)

    priors = _mean_priors(priors_seen) or _train_priors(data_dir)
    fallback = prior_predictions(priors, meta["task"]) if priors else np.full(len(meta), 0.5)
    weights = {m["model"]: float(m["weight"]) for m in members if m["model"] in model_logits}
    total_w = sum(weights.values())
    final = fallback.copy()
    used_fallback = np.ones(len(meta), bool)
    per_model = {}
    if model_logits:  # at least one model predicted (a weight of 0 is a bias-only blend, still a model's)
        full_w = sum(float(m["weight"]) for m in members)
        scale = full_w / total_w if total_w > 0 else 1.0  # renormalise over the models that ran
        z = np.zeros(len(meta))
        have = np.ones(len(meta), bool)
        for name, w in weights.items():
            mean_logit = np.nanmean(np.stack(model_logits[name]), axis=0)
            per_model[name] = mean_logit
            have &= np.isfinite(mean_logit)
            z += w * scale * np.nan_to_num(mean_logit)
        final = np.where(have, sigmoid(z + bias), fallback)
        used_fallback = ~have
    sub = pd.DataFrame({"filename": fmt["filename"], "score": clip_prob(final)})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_csv(sub, out)
    result = {"submission": str(out), "rows": len(sub), "models_used": sorted(weights),
              "checkpoints_used": sum(len(v) for v in model_logits.values()),
              "checkpoints_listed": len(checkpoints), "fallback_rows": int(used_fallback.sum()), "seconds": time.time() - start}
    if test.has_labels:
        y = meta["score"].to_numpy(dtype=float)
        ok = np.isfinite(y)
        result["test_logloss"] = log_loss(y[ok], sub["score"].to_numpy()[ok])
        result["test_logloss_prior"] = log_loss(y[ok], fallback[ok])
        result["test_logloss_single"] = {m: log_loss(y[ok], sigmoid(np.nan_to_num(v))[ok])
                                         for m, v in per_model.items()}
    if not model_logits:
        result["error"] = "no model could make a prediction: the submission holds priors only"
    return result


def _predict_gbm(fm: FoldModel, meta: pd.DataFrame, known: np.ndarray, data_dir: Path, tts_dir, listed: list,
                 clips, alignment: dict, progress: bool) -> np.ndarray:
    """Logits of a gbm fold model for every row of `meta` (NaN where it cannot predict); the
    alignment features are computed for the first gbm model and reused by the others."""
    from .alignment import acoustic_table, alignment_cache_path
    params = FeatureParams(n_mels=fm.cfg.model.n_mels)
    key = (fm.cfg.tts, params)
    if key not in alignment:
        if params != FeatureParams():
            clips, _ = ensure_clip_features(data_dir, listed, params, progress=progress)
        refs = ensure_references(tts_dir, fm.cfg.tts, meta.loc[known, "expected_text"].unique(), params,
                                 progress=progress)
        alignment[key] = acoustic_table(meta[known], clips, refs, alignment_cache_path(data_dir, refs), progress)
    logits = np.full(len(meta), np.nan)
    logits[np.flatnonzero(known)] = fm.model.predict(meta[known], alignment[key])
    return logits


def _default_members(assets_dir: Path) -> list[dict]:
    groups: dict[str, list[str]] = {}
    for p in sorted(assets_dir.glob("*_*.pth")):
        model = p.stem.rsplit("_", 1)[0]
        groups.setdefault(model, []).append(p.name)
    return [{"model": m, "weight": 1.0 / len(groups), "checkpoints": c} for m, c in groups.items()]


def _mean_priors(priors: list[dict]) -> dict:
    if not priors:
        return {}
    keys = set().union(*priors)
    return {k: float(np.mean([p[k] for p in priors if k in p])) for k in keys}


def _train_priors(data_dir: Path) -> dict:
    try:
        from .metrics import task_priors
        return task_priors(load_split(data_dir, "train", check_audio=False).meta)
    except (DataError, OSError, KeyError):
        return {}


def write_fallback_submission(data_dir: str | Path, assets_dir: str | Path, out: str | Path) -> int:
    """Last resort when inference itself failed: the submission format's rows with task priors
    (from any readable checkpoint, else the training labels, else 0.5). Returns the row count."""
    data_dir, assets_dir = Path(data_dir), Path(assets_dir)
    fmt = load_submission_format(data_dir)
    priors: dict = {}
    for ck in sorted(assets_dir.glob("*_*.pth")):
        try:
            priors = json.loads(safe_load(ck)["priors"])
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
