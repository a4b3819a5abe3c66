"""Gradient boosting on alignment features: a fast, non-neural ensemble member (model.arch=gbm).

`GBMMember.fit` fits one fold; run_fold writes it exactly where a neural fold goes (same
folds, same bad-clip handling, same files: `<variant>_<fold>.pth`, `_oof.csv`, `.json`,
`runs/<variant>_<fold>/`), so check_models.py, get_config.py and infer.py treat it like any other model.

The classifier is scikit-learn's HistGradientBoostingClassifier on the features of
alignment.py. The checkpoint holds no pickled scikit-learn object: the fitted trees are
exported to plain tensors (one padded row of nodes per tree: feature, threshold, where a
missing value goes, children, leaf flag, leaf value) plus the baseline, and `TreeEnsemble`
predicts from them with a vectorised numpy traversal, so the file loads with
torch.load(weights_only=True) like every other checkpoint.
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

from ..checkpoints import CheckpointError, atomic_csv
from ..config import ModelConfig, RunConfig
from ..prep.dataset import Categories
from ..prep.prepare import TrainingInputs
from .alignment import (ACOUSTIC_NAMES, ALIGN_VERSION, CATEGORY_NAMES, FEATURE_NAMES, acoustic_table,
                        alignment_cache_path, category_codes)
from .base import FitContext, FitResult, FoldData, Member, TestInputs

log = logging.getLogger("readaloud.train")
NODE_FIELDS = ("feature", "threshold", "missing_go_to_left", "left", "right", "is_leaf", "value")


# ---- trees as plain arrays ---------------------------------------------------------------------

def export_trees(clf) -> dict[str, torch.Tensor]:
    """The fitted trees of a binary HistGradientBoostingClassifier as padded tensors
    [n_trees, max_nodes] (+ `baseline` [1]); decision_function = baseline + sum of leaf values."""
    trees = [p for it in clf._predictors for p in it]
    if len(clf._predictors) and len(clf._predictors[0]) != 1:
        raise ValueError("only binary classifiers (one tree per iteration) can be exported")
    if any(t.nodes["is_categorical"].any() for t in trees):
        raise ValueError("categorical splits are not exported: give categories as numeric codes")
    n_nodes = max([len(t.nodes) for t in trees], default=1)
    out = {"feature": np.zeros((len(trees), n_nodes), np.int64),
           "threshold": np.zeros((len(trees), n_nodes), np.float64),
           "missing_go_to_left": np.zeros((len(trees), n_nodes), bool),
           "left": np.zeros((len(trees), n_nodes), np.int64),
           "right": np.zeros((len(trees), n_nodes), np.int64),
           "is_leaf": np.ones((len(trees), n_nodes), bool),       # padding: leaves worth 0
           "value": np.zeros((len(trees), n_nodes), np.float64)}
    for i, t in enumerate(trees):
        nd, k = t.nodes, len(t.nodes)
        out["feature"][i, :k] = nd["feature_idx"]
        out["threshold"][i, :k] = nd["num_threshold"]
        out["missing_go_to_left"][i, :k] = nd["missing_go_to_left"].astype(bool)
        out["left"][i, :k] = nd["left"]
        out["right"][i, :k] = nd["right"]
        out["is_leaf"][i, :k] = nd["is_leaf"].astype(bool)
        out["value"][i, :k] = np.where(nd["is_leaf"].astype(bool), nd["value"], 0.0)
    state = {k: torch.from_numpy(v) for k, v in out.items()}
    state["baseline"] = torch.tensor(np.asarray(clf._baseline_prediction, np.float64).reshape(-1)[:1])
    return state


class TreeEnsemble:
    """Raw scores (logits) of exported trees: baseline + the sum over trees of the leaf reached."""

    def __init__(self, state: dict, n_features: int | None = None):
        try:
            arrays = {k: np.asarray(state[k].numpy() if torch.is_tensor(state[k]) else state[k])
                      for k in NODE_FIELDS}
            self.baseline = float(np.asarray(state["baseline"]).reshape(-1)[0])
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"not a tree ensemble ({type(exc).__name__}: {exc})") from exc
        shapes = {a.shape for a in arrays.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise CheckpointError(f"tree arrays of inconsistent shapes {sorted(shapes)}")
        self.feature = arrays["feature"].astype(np.int64)
        self.threshold = arrays["threshold"].astype(np.float64)
        self.missing_left = arrays["missing_go_to_left"].astype(bool)
        self.left = arrays["left"].astype(np.int64)
        self.right = arrays["right"].astype(np.int64)
        self.is_leaf = arrays["is_leaf"].astype(bool)
        self.value = arrays["value"].astype(np.float64)
        n_trees, n_nodes = self.feature.shape
        inner = ~self.is_leaf
        if n_trees and ((self.left[inner] < 0) | (self.left[inner] >= n_nodes) | (self.right[inner] < 0)
                        | (self.right[inner] >= n_nodes)).any():
            raise CheckpointError("tree arrays point outside their tree")
        if n_features is not None and n_trees and inner.any() and self.feature[inner].max() >= n_features:
            raise CheckpointError(f"trees use feature {self.feature[inner].max()} of {n_features}")
        self.n_trees = n_trees

    def decision_function(self, X: np.ndarray, chunk: int = 4096) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        out = np.full(X.shape[0], self.baseline)
        if not self.n_trees:
            return out
        n_nodes = self.feature.shape[1]
        base = (np.arange(self.n_trees) * n_nodes)[None, :]      # flat node index = tree * n_nodes + node
        feature, threshold = self.feature.ravel(), self.threshold.ravel()
        missing_left, is_leaf = self.missing_left.ravel(), self.is_leaf.ravel()
        left, right, value = self.left.ravel(), self.right.ravel(), self.value.ravel()
        for a in range(0, X.shape[0], chunk):
            x = X[a: a + chunk]
            n_rows, n_cols = x.shape
            flat_x = x.ravel()
            row_base = (np.arange(n_rows) * n_cols)[:, None]
            node = np.broadcast_to(base, (n_rows, self.n_trees)).copy()
            while True:  # one level of every tree for every row per pass; stops when all sit on leaves
                leaf = is_leaf[node]
                if leaf.all():
                    break
                v = flat_x[row_base + feature[node]]
                go_left = np.where(np.isnan(v), missing_left[node], v <= threshold[node])
                nxt = base + np.where(go_left, left[node], right[node])
                node = np.where(leaf, node, nxt)
            out[a: a + chunk] += value[node].sum(axis=1)
        return out


def fit_gbm(X: np.ndarray, y: np.ndarray, mc: ModelConfig, seed: int):
    """HistGradientBoostingClassifier with the config's settings; early stopping on an internal
    10% split when there are enough clips for it to mean something."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    early = len(y) >= 200 and min(np.bincount(y.astype(int), minlength=2)) >= 20
    clf = HistGradientBoostingClassifier(
        loss="log_loss", learning_rate=mc.gbm_learning_rate, max_iter=mc.gbm_max_iter,
        max_leaf_nodes=mc.gbm_max_leaf_nodes, min_samples_leaf=mc.gbm_min_samples_leaf,
        l2_regularization=mc.gbm_l2, early_stopping=early, validation_fraction=0.1 if early else None,
        n_iter_no_change=20, scoring="loss", random_state=seed % 2**32)
    return clf.fit(X, y.astype(int))


# ---- the member ----------------------------------------------------------

def features_for(meta: pd.DataFrame, clips, refs, tasks: list[str], acoustic: tuple | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """[len(meta), len(FEATURE_NAMES)] and the rows whose clip and reference were usable."""
    A, ok = acoustic if acoustic is not None else acoustic_table(meta, clips, refs)
    return np.hstack([A, category_codes(meta, tasks)]), ok


class GBMMember(Member):
    """Gradient boosting on alignment features (model.arch = gbm): same folds, same fold files, no network."""
    family = "gbm"

    def environment(self) -> dict:
        try:
            import sklearn
        except ImportError:
            raise RuntimeError("model.arch=gbm needs scikit-learn: pip install scikit-learn") from None
        return {"sklearn": sklearn.__version__}

    def prepare_shared(self, inputs: TrainingInputs, cfgs: list[RunConfig], data_dir: Path,
                       progress: bool = True) -> None:
        """The alignment features of every training clip, once per (TTS, n_mels): every fold reads them."""
        for tts, n_mels in sorted({(c.tts, c.model.n_mels) for c in cfgs}):
            refs = inputs.banks[tts, n_mels]
            acoustic_table(inputs.meta, inputs.stores[n_mels], refs, alignment_cache_path(data_dir, refs), progress)

    def fit(self, data: FoldData, ctx: FitContext) -> FitResult:
        """Fit the trees on every fold but `data.fold`, predict it."""
        t0 = time.time()
        cfg, meta, is_valid = data.cfg, data.meta, data.is_valid
        X, ok = features_for(meta, data.clips, data.refs, data.cats.tasks,
                             acoustic_table(meta, data.clips, data.refs, alignment_cache_path(data.data_dir, data.refs),
                                            data.progress))
        t_feat = time.time() - t0
        y = meta["score"].to_numpy()
        fit_rows = ~is_valid & ok
        log.info("fold %d: %d train / %d valid clips, %d features, data and features ready in %.1fs", data.fold,
                 int(fit_rows.sum()), int(is_valid.sum()), X.shape[1], t_feat)
        from threadpoolctl import threadpool_limits  # comes with scikit-learn, which environment() checked
        threads = cfg.threads if cfg.threads > 0 else torch.get_num_threads()
        with threadpool_limits(limits=threads):
            clf = fit_gbm(X[fit_rows], y[fit_rows], cfg.model, data.seed)
            state = export_trees(clf)
            trees = TreeEnsemble(state, len(FEATURE_NAMES))
            valid_rows = is_valid & ok
            valid_logits = trees.decision_function(X[valid_rows])
            if valid_rows.any():
                ref = clf.decision_function(X[valid_rows])
                if not np.allclose(valid_logits, ref, rtol=0, atol=1e-6):
                    raise RuntimeError(f"exported trees disagree with scikit-learn by "
                                       f"{np.abs(valid_logits - ref).max():.2e}")
        n_iter = int(clf.n_iter_)
        history = pd.DataFrame({"step": np.arange(len(clf.train_score_)), "train_logloss": -clf.train_score_})
        if len(getattr(clf, "validation_score_", [])):
            history["internal_valid_logloss"] = -clf.validation_score_
        atomic_csv(history, ctx.paths.metrics)
        stopped = f"early stop at iteration {n_iter} of {cfg.model.gbm_max_iter}" \
            if clf.do_early_stopping_ and n_iter < cfg.model.gbm_max_iter else ""
        summary = {"best_epoch": 1, "best_step": n_iter, "epochs_run": 1, "updates": n_iter, "stopped": stopped,
                   "n_train": int(fit_rows.sum()), "n_trees": trees.n_trees, "n_features": len(FEATURE_NAMES),
                   "feature_seconds": t_feat}
        payload = {"feature_names": list(FEATURE_NAMES), "align_version": ALIGN_VERSION, "n_iter": n_iter,
                   "state_dict": state}
        log.info("%s: %d trees", ctx.paths.stem, trees.n_trees)
        return FitResult(dict(zip(meta.loc[valid_rows, "filename"], valid_logits)), payload, summary)

    def load(self, ck: dict, device=None) -> "GBMPredictor":
        try:
            cfg = RunConfig.from_dict(json.loads(ck["config"]))
            cats = Categories(list(ck["tasks"]), list(ck["grades"]))
            return GBMPredictor(GBMModel(ck), cfg, cats, json.loads(ck["priors"]))
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:  # CheckpointError is a RuntimeError
            raise CheckpointError(f"not a usable gbm checkpoint ({exc})") from exc


# ---- inference ---------------------------------------------------------------------------------

class GBMModel:
    """A loaded gbm checkpoint: trees + the feature layout they were trained on."""

    max_frames = None

    def __init__(self, ck: dict):
        names = list(ck["feature_names"])
        if int(ck.get("align_version", -1)) != ALIGN_VERSION:
            raise CheckpointError(f"alignment features version {ck.get('align_version')} != {ALIGN_VERSION} "
                                  f"of this code: retrain the fold")
        unknown = [n for n in names if n not in FEATURE_NAMES]
        if unknown:
            raise CheckpointError(f"trained on features this code does not make: {unknown[:5]}")
        self.feature_names = names
        self.columns = [FEATURE_NAMES.index(n) for n in names]
        self.trees = TreeEnsemble(ck["state_dict"], len(names))
        self.tasks = list(ck["tasks"])

    def predict(self, meta: pd.DataFrame, acoustic: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Logits for the rows of `meta` (NaN where the clip or its reference was unusable),
        from its precomputed acoustic features (acoustic_table, shared by every gbm model)."""
        A, ok = acoustic
        X = np.hstack([A, category_codes(meta, self.tasks)])[:, self.columns]
        out = np.full(len(meta), np.nan)
        out[ok] = self.trees.decision_function(X[ok])
        return out


assert FEATURE_NAMES == ACOUSTIC_NAMES + CATEGORY_NAMES


@dataclass
class GBMPredictor:
    """A loaded gbm fold; the alignment features of the test rows are computed for the first
    gbm fold and reused by the others (TestInputs.shared)."""
    model: GBMModel
    cfg: RunConfig
    cats: Categories
    priors: dict

    def predict(self, inputs: TestInputs) -> np.ndarray:
        n_mels = self.cfg.model.n_mels
        key = ("gbm alignment", self.cfg.tts, n_mels)
        if key not in inputs.shared:
            refs = inputs.refs(self.cfg.tts, n_mels)
            inputs.shared[key] = acoustic_table(inputs.rows, inputs.clips(n_mels), refs,
                                                alignment_cache_path(inputs.data_dir, refs), inputs.progress)
        out = np.full(len(inputs.meta), np.nan)
        out[inputs.rows.index] = self.model.predict(inputs.rows, inputs.shared[key])
        return out
