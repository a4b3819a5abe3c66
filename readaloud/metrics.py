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
