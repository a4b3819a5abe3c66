"""What the fold ear hears, as evidence for the pair classifier's head (`--ear_evidence`).

The pair's encoder compares the child's speech with a synthetic voice's in Whisper's encoder space; on
a thousand children's clips that comparison alone does not tell a swapped word from a right one
(docs/members.md, the pair family). The ear that model6asr reads (members/gbm/fold_ears.py: tiny.en's
decoder fine-tuned on the training children inside each fold) does: how likely it finds the expected
text, how far its transcript is from it. With `ear_evidence` the pair's head reads that block beside
its pooled encoding, as the from-scratch pair reads its CTC head's match score.

No row is read by an ear that heard it: a fold's rows, held-out ones included, are each read by the ear
of their own fold (trained on the other folds), and test rows by the ear of every fold, published
beside the checkpoints as model6asr's is (the same ear when the recipes agree: trained once).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..base import FoldData, TestInputs
from ..gbm import evidence as asr
from ..gbm.fold_ears import FoldEars, recipe_of, shared_ear_table, train_fold_ears

# the ear block's numbers, then whether the ear read the row at all, and whether its transcript was empty
EAR_INPUTS = len(asr.FEATURE_NAMES) + 2
EAR_PRIOR_C = 0.1   # the ear's own score: inverse L2 strength of its logistic regression on standardised inputs
_TRANSCRIPT_LOGP = asr.FEATURE_NAMES.index("tr_mean_logp")


def ear_inputs(table: asr.AsrTable) -> np.ndarray:
    """[rows, EAR_INPUTS] float32 for the head: the ear's evidence with its gaps set to 0 and flagged
    (a row the ear could not read; an empty transcript, whose own log p does not exist)."""
    X = np.asarray(table.X, np.float32).copy()
    ok = np.asarray(table.ok, bool)
    empty = ok & np.isnan(X[:, _TRANSCRIPT_LOGP])
    X[~ok] = 0.0
    X = np.nan_to_num(X, nan=0.0, posinf=0.0, neginf=0.0)
    return np.concatenate([X, ok[:, None].astype(np.float32), empty[:, None].astype(np.float32)], axis=1)


def fold_ear_inputs(data: FoldData, threads: int = 0) -> tuple[FoldEars, dict[str, np.ndarray]]:
    """The fold ears of `data.meta`'s folds (trained now unless finished) and every row's ear inputs, each row
    read by the ear of its own fold: {filename: vector}."""
    ears = train_fold_ears(recipe_of(data.cfg.model), data.data_dir, data.meta, asr.asr_device(data.cfg.device),
                           threads, data.progress)
    table = ears.table(data.meta, data.data_dir, data.progress)
    return ears, dict(zip(data.meta["filename"].astype(str), ear_inputs(table)))


def test_ear_inputs(data_model, ear: Path, inputs: TestInputs) -> dict[str, np.ndarray]:
    """The test rows read by the ear of every fold (`ear`, published; `data_model`: the fold's ModelConfig, whose
    asr_ear_* options made it): {filename: vector}. Shared with every member of the run that reads that ear."""
    table = shared_ear_table(recipe_of(data_model), ear, inputs)
    return dict(zip(inputs.rows["filename"].astype(str), ear_inputs(table)))


@dataclass
class EarPrior:
    """The ear's own score of a row: a logistic regression on its standardised inputs, fitted on a fold's training
    rows. The pair network starts from it and learns what the comparison of the halves adds (PairClassifier)."""
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float

    def logits(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, np.float64) - self.mean) / self.scale) @ self.weight + self.bias


def fit_ear_prior(X: np.ndarray, y: np.ndarray, c: float = EAR_PRIOR_C) -> EarPrior:
    """The ear's logistic regression on rows `X` with labels `y` (deterministic: lbfgs on the whole set). With one
    label only (a tiny fold), the weights are 0 and the bias is that rate's logit."""
    from sklearn.linear_model import LogisticRegression
    X, y = np.asarray(X, np.float64), np.asarray(y).astype(int)
    mean, scale = X.mean(0), X.std(0)
    scale = np.where(scale > 1e-6, scale, 1.0)
    if len(set(y.tolist())) < 2:
        rate = float(np.clip(y.mean() if len(y) else 0.5, 0.02, 0.98))
        return EarPrior(mean, scale, np.zeros(X.shape[1]), float(np.log(rate / (1 - rate))))
    model = LogisticRegression(C=c, max_iter=5000).fit((X - mean) / scale, y)
    return EarPrior(mean, scale, model.coef_[0].astype(np.float64), float(model.intercept_[0]))


def rows_of(by_filename: dict[str, np.ndarray], meta: pd.DataFrame) -> np.ndarray:
    """The vectors of `meta`'s rows, in its order; a row without one is an error naming it."""
    missing = [f for f in meta["filename"].astype(str) if f not in by_filename]
    if missing:
        raise KeyError(f"no fold-ear evidence for {len(missing)} rows, e.g. {missing[:3]}")
    return np.stack([by_filename[f] for f in meta["filename"].astype(str)]).astype(np.float32) if len(meta) \
        else np.zeros((0, EAR_INPUTS), np.float32)
