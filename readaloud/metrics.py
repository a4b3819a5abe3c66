"""Log loss and priors, clipped the way the competition scores."""
from __future__ import annotations

import numpy as np
import pandas as pd

EPS = 1e-4  # predictions are kept inside [EPS, 1 - EPS]


def clip_prob(p) -> np.ndarray:
    return np.clip(np.nan_to_num(np.asarray(p, dtype=np.float64), nan=0.5), EPS, 1 - EPS)


def log_loss(y, p) -> float:
    y = np.asarray(y, dtype=np.float64)
    p = clip_prob(p)
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def logit(p) -> np.ndarray:
    p = clip_prob(p)
    return np.log(p / (1 - p))


def sigmoid(x) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def task_priors(meta: pd.DataFrame, smoothing: float = 10.0) -> dict[str, float]:
    """P(score = 1) per task, shrunk toward the overall rate; key '' is the overall rate."""
    overall = float(meta["score"].mean())
    out = {"": overall}
    for task, g in meta.groupby("task"):
        out[str(task)] = float((g["score"].sum() + smoothing * overall) / (len(g) + smoothing))
    return out


def prior_predictions(priors: dict[str, float], tasks) -> np.ndarray:
    return np.array([priors.get(str(t), priors[""]) for t in tasks], dtype=np.float64)


def log_loss_decomposition(y, p) -> dict[str, float]:
    """Log loss split into what recalibration could fix and what it could not (the CORP
    decomposition, Dimitriadis, Gneiting & Jordan 2021): log loss = miscalibration - discrimination
    + uncertainty. `recalibrated` is the log loss after the best non-decreasing map of `p`, fitted
    by pool-adjacent-violators on these very labels (tied predictions share one value): no
    calibration of these scores, however it was fitted, can score lower on these clips. So a
    speaker whose `recalibrated` is above a target needs better-ranked scores, not a better
    calibration. `uncertainty` is the log loss of the labels' own base rate.

    Every probability is clipped to [EPS, 1 - EPS] as `log_loss` clips it (the clipped PAV fit is
    the best monotone map within those bounds), so miscalibration >= 0 and discrimination >= 0
    up to rounding, and the three parts add up to `log_loss(y, p)` exactly."""
    from sklearn.isotonic import IsotonicRegression
    y = np.asarray(y, dtype=np.float64)
    p = clip_prob(p)
    if y.size == 0:
        nan = float("nan")
        return {"logloss": nan, "miscalibration": nan, "discrimination": nan, "uncertainty": nan,
                "recalibrated": nan}
    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(p, y).predict(p)
    total, recalibrated = log_loss(y, p), log_loss(y, fitted)
    uncertainty = log_loss(y, np.full_like(y, y.mean()))
    return {"logloss": total, "miscalibration": total - recalibrated, "discrimination": uncertainty - recalibrated,
            "uncertainty": uncertainty, "recalibrated": recalibrated}
