"""Ensemble weights fitted on out-of-fold predictions.

Each model's OOF logits (every training clip predicted by the fold model that did not see
it) form a column; non-negative weights and a bias minimise the log loss of
sigmoid(logits @ w + b). A model's test logit is the mean over its shipped folds, so the
same weights apply. Working in logit space lets the blend also recalibrate.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from ..checkpoints import atomic_write
from ..layout import ENSEMBLE_JSON, ENSEMBLE_PKL, FoldPaths, saved_folds
from ..metrics import log_loss, sigmoid
from ..prep.folds import UNHEARD_SCHEMES, fold_scheme


def collect_oof(assets: str | Path, models: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """{model: its OOF rows from every finished fold}; the folds are those whose saved summary
    names them (layout.saved_folds)."""
    out: dict[str, list[pd.DataFrame]] = {}
    for paths in sorted(saved_folds(assets), key=lambda p: (p.variant, p.fold)):
        if (models and paths.variant not in models) or not paths.finished():
            continue
        out.setdefault(paths.variant, []).append(pd.read_csv(paths.oof, dtype={"filename": str, "grade": str}))
    return {m: pd.concat(dfs, ignore_index=True) for m, dfs in out.items()}


def oof_matrix(oofs: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, list[str]]:
    """Align models on the clips that all of them predicted: columns = model logits."""
    names = sorted(oofs)
    base = None
    for m in names:
        df = oofs[m][["filename", "fold", "task", "grade", "score", "logit"]].rename(columns={"logit": m})
        base = df if base is None else base.merge(df[["filename", m]], on="filename", how="inner")
    return base, names


def fit_weights(X: np.ndarray, y: np.ndarray, l2: float = 1e-4) -> tuple[np.ndarray, float]:
    """Non-negative w and a bias b minimising log loss of sigmoid(X w + b) (+ a tiny L2)."""
    n, m = X.shape
    y = y.astype(np.float64)

    def f(theta):
        w, b = theta[:m], theta[m]
        z = X @ w + b
        p = sigmoid(z)
        loss = np.mean(np.logaddexp(0, z) - y * z) + l2 * np.sum(w ** 2)
        g = (p - y) / n
        return loss, np.concatenate([X.T @ g + 2 * l2 * w, [g.sum()]])

    x0 = np.concatenate([np.full(m, 1.0 / m), [0.0]])
    res = minimize(f, x0, jac=True, method="L-BFGS-B", bounds=[(0, None)] * m + [(None, None)])
    return res.x[:m], float(res.x[m])


def fit_convex_weights(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Weights on the simplex (non-negative, summing to 1) and no bias: the blend can choose
    between models but cannot sharpen or shift them, which keeps calibration learned on OOF
    data from backfiring on a shifted test set (e.g. voices never heard in training)."""
    m = X.shape[1]
    y = y.astype(np.float64)

    def f(w):
        z = X @ w
        return np.mean(np.logaddexp(0, z) - y * z), X.T @ (sigmoid(z) - y) / len(y)

    res = minimize(f, np.full(m, 1.0 / m), jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * m,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(m)}])
    w = np.clip(res.x, 0.0, None)
    return w / w.sum(), 0.0


def cross_fitted_logits(table: pd.DataFrame, names: list[str], blend: str) -> np.ndarray:
    """The blend's logit of every OOF clip with its weights fitted on the other folds' clips only.

    The blend's own OOF figure (`oof_logloss`) scores the weights on the clips they were fitted on;
    refitting without each fold in turn scores the ensemble as a whole on clips nothing of it saw,
    so a choice made on it cannot be over-tuned to the blend. With a single fold there is nothing
    to hold out: the in-sample blend is returned."""
    X, y, folds = table[names].to_numpy(np.float64), table["score"].to_numpy(), table["fold"].to_numpy()
    fit = fit_weights if blend == "logit" else fit_convex_weights
    if len(np.unique(folds)) < 2:
        w, b = fit(X, y)
        return X @ w + b
    out = np.zeros(len(y))
    for k in np.unique(folds):
        held = folds == k
        w, b = fit(X[~held], y[~held])
        out[held] = X[held] @ w + b
    return out


def choose_folds(assets: str | Path, model: str, available: list[int], max_folds: int | None) -> list[int]:
    """The folds whose checkpoints to ship: all, or the `max_folds` with the best validation loss."""
    if not max_folds or max_folds >= len(available):
        return sorted(available)
    losses = {f: (FoldPaths(Path(assets), model, f).read_summary() or {}).get("valid_logloss", np.inf)
              for f in available}
    return sorted(sorted(available, key=lambda f: losses[f])[:max_folds])


def build_config(assets: str | Path, models: list[str] | None = None, max_folds: int | None = None,
                 min_weight: float = 1e-3, blend: str = "auto", data_dir: str | Path | None = None) -> dict:
    """Fit the ensemble on the OOF predictions in `assets`; returns the config dict.

    blend="logit": non-negative weights + bias, free to recalibrate the members on OOF.
    blend="convex": non-negative weights summing to 1, no bias: cannot sharpen.
    blend="auto" (default): logit when the folds are voice or groups folds (folds.py: OOF clips
    are voices or children the fold's model never heard, like the test's children, so what OOF teaches the
    blend holds on the test), convex when they are stratified: then OOF clips share speakers
    with the training folds and are more confident-and-right than predictions for new
    children; a free blend learns to sharpen them, and that backfired on a new voice
    (docs/members.md, "Measurements behind the code")."""
    if blend not in ("auto", "logit", "convex"):
        raise ValueError(f"blend must be 'auto', 'logit' or 'convex', got {blend!r}")
    oofs = collect_oof(assets, models)
    if not oofs:
        raise FileNotFoundError(f"no finished folds (<model>_<fold>.pth with _oof.csv) in {assets}; run train.py first")
    n_folds = int(max(df["fold"].max() for df in oofs.values()) + 1)
    fold_by = fold_scheme(data_dir, n_folds) if data_dir is not None else "unknown"
    if blend == "auto":
        blend = "logit" if fold_by in UNHEARD_SCHEMES else "convex"
    table, names = oof_matrix(oofs)
    X, y = table[names].to_numpy(np.float64), table["score"].to_numpy()
    w, b = fit_weights(X, y) if blend == "logit" else fit_convex_weights(X, y)
    singles = {m: log_loss(y, sigmoid(table[m])) for m in names}
    ens_pred = sigmoid(X @ w + b)
    members = []
    for m, wm in zip(names, w):
        if wm < min_weight:
            continue
        folds = sorted(int(f) for f in oofs[m]["fold"].unique())
        chosen = choose_folds(assets, m, folds, max_folds)
        members.append({"model": m, "weight": float(wm), "folds": chosen,
                        "checkpoints": [FoldPaths(Path(assets), m, f).checkpoint.name for f in chosen], "oof_logloss": singles[m]})
    if not members:  # no model adds anything over the bias: ship the best one alone, refitted
        best = min(singles, key=singles.get)
        j = names.index(best)
        (wb,), b = fit_weights(X[:, [j]], y) if blend == "logit" else ((1.0,), 0.0)
        ens_pred = sigmoid(X[:, j] * wb + b)
        folds = sorted(int(f) for f in oofs[best]["fold"].unique())
        chosen = choose_folds(assets, best, folds, max_folds)
        members = [{"model": best, "weight": float(wb), "folds": chosen,
                    "checkpoints": [FoldPaths(Path(assets), best, f).checkpoint.name for f in chosen], "oof_logloss": singles[best],
                    "note": "no model earned weight in the blend: the best single model, refitted alone"}]
    prior = float(y.mean())
    return {
        "format": 1,
        "members": members,
        "bias": b,
        "n_oof": int(len(y)),
        "oof_logloss": log_loss(y, ens_pred),
        "oof_logloss_cross_fitted": log_loss(y, sigmoid(cross_fitted_logits(table, names, blend))),
        "oof_logloss_single": singles,
        "best_single": min(singles, key=singles.get),
        "oof_logloss_prior": log_loss(y, np.full(len(y), prior)),
        "max_folds": max_folds,
        "blend": blend,
        "fold_by": fold_by,
        "n_folds": n_folds,
    }


def write_config(config: dict, assets: str | Path) -> tuple[Path, Path]:
    """model_configs.json (the source of truth) and model_configs.pkl (a plain-dict twin)."""
    assets = Path(assets)
    js, pk = assets / ENSEMBLE_JSON, assets / ENSEMBLE_PKL
    atomic_write(js, json.dumps(config, indent=1))
    atomic_write(pk, pickle.dumps(config, protocol=4))
    return js, pk


class _PlainUnpickler(pickle.Unpickler):
    """Refuses every global: only dicts, lists, strings and numbers can come out."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a pickle")


def read_config(assets: str | Path) -> dict:
    """The ensemble config: from the JSON; from the pickle (plain data only) if no JSON."""
    assets = Path(assets)
    js, pk = assets / ENSEMBLE_JSON, assets / ENSEMBLE_PKL
    if js.exists():
        return json.loads(js.read_text())
    if pk.exists():
        with open(pk, "rb") as f:
            return _PlainUnpickler(f).load()
    raise FileNotFoundError(f"no {ENSEMBLE_JSON} in {assets}; run get_config.py")
