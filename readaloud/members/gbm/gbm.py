"""Gradient boosting on alignment features: a fast, non-neural ensemble member (model.arch=gbm).

`GBMMember.fit` fits one fold; run_fold writes it exactly where a neural fold goes (same
folds, same bad-clip handling, same files: `<variant>_<fold>.pth`, `_oof.csv`, `.json`,
`runs/<variant>_<fold>/`), so check_models.py, get_config.py and infer.py treat it like any other model.

The classifier is scikit-learn's HistGradientBoostingClassifier on a feature table chosen by
`model.gbm_features`: the alignment features of alignment.py, the ASR evidence of pretrained
Whisper models (evidence.py, one block per `model.asr_backbones` entry), or both, then the
task and grade codes. Both kinds are computed once per clip and cached in the data folder
(`prepare_shared` fills the caches before parallel folds start; inference fills them for test
rows through TestInputs.shared). The checkpoint holds no pickled scikit-learn object: the fitted trees are
exported to plain tensors (one padded row of nodes per tree: feature, threshold, where a
missing value goes, children, leaf flag, leaf value) plus the baseline, and `TreeEnsemble`
predicts from them with a vectorised numpy traversal, so the file loads with
torch.load(weights_only=True) like every other checkpoint.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ...checkpoints import CheckpointError, atomic_csv
from ...config import ConfigError, ModelConfig, RunConfig
from ...metrics import log_loss, sigmoid
from ...features import FeatureParams
from ...prep.dataset import Categories
from .ear_augment import EarAugment, ensure_copies
from ...prep.folds import UNHEARD_SCHEMES, FoldFileError, data_set_n_folds, fold_scheme, load_or_create_folds
from ...prep.prepare import TrainingInputs, ensure_clip_features
from . import evidence as asr
from .closed import (CLOSED_FEATURE_NAMES, CLOSED_LOGP_NAMES, add_to_closed_cache, closed_cache_path,
                              closed_logp_block, closed_table, new_word_rows, pending_requests, task_words)
from ...whisper.backbones import NAMED_BACKBONES
from .loops import LOOP_FEATURE_NAMES, loop_block
from . import prompted as prompted_log_p
from .prompted import PROMPT_FEATURE_NAMES, prompted_block, prompted_cache_path, prompted_table
from .evidence import asr_device
from .fold_ears import FoldEars, checkpoint_ear, ear_payload, recipe_of, shared_ear_table, train_fold_ears, with_folds
from .alignment import (ACOUSTIC_NAMES, ALIGN_VERSION, CATEGORY_NAMES, FEATURE_NAMES, acoustic_table,
                        alignment_cache_path, category_codes)
from ..base import FitContext, FitResult, FoldData, Member, TestInputs

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


def _classifier(mc: ModelConfig, seed: int, max_iter: int, early: bool):
    from sklearn.ensemble import HistGradientBoostingClassifier
    return HistGradientBoostingClassifier(
        loss="log_loss", learning_rate=mc.gbm_learning_rate, max_iter=max_iter,
        max_leaf_nodes=mc.gbm_max_leaf_nodes, min_samples_leaf=mc.gbm_min_samples_leaf,
        l2_regularization=mc.gbm_l2, early_stopping=early, validation_fraction=0.1 if early else None,
        n_iter_no_change=20, scoring="loss", random_state=seed % 2**32)


def _enough(y: np.ndarray) -> bool:
    """Enough clips of each class for a loss on them to mean something."""
    return len(y) >= 200 and min(np.bincount(y.astype(int), minlength=2)) >= 20


def fit_gbm(X: np.ndarray, y: np.ndarray, mc: ModelConfig, seed: int, stop_folds: np.ndarray | None = None,
            stop_fold: int | None = None, copies: np.ndarray | None = None):
    """HistGradientBoostingClassifier with the config's settings and early stopping.

    Without `stop_folds`: on an internal random 10% split of the clips. With them (the fold of each
    row, when folds keep voices apart): the trees grow on every training fold but `stop_fold`, the
    iteration count is the one with the lowest log loss on that whole fold, and the model is refit
    on all rows at that count. A random split would put clips of one child on both sides, so it
    stops late on voices already heard, and it would leave 10% of the clips out of the final fit
    (measured on the children's set: docs/members.md, "Measurements behind the code").

    `copies` (bool per row): the ear copies among the rows. They train but do not judge: the
    stopping fold's loss is taken on its real clips only (a copy stands in for a voice Whisper
    mishears; it is not what the trees will score; docs/members.md, "model6asr's trees").
    """
    y = y.astype(int)
    if stop_folds is not None:
        held = np.asarray(stop_folds) == stop_fold
        judged = held & ~np.asarray(copies, bool) if copies is not None else held
        if judged.any() and (~held).any() and _enough(y[~held]) and min(np.bincount(y[judged], minlength=2)) >= 10:
            inner = _classifier(mc, seed, mc.gbm_max_iter, early=False).fit(X[~held], y[~held])
            losses = [log_loss(y[judged], sigmoid(d)) for d in inner.staged_decision_function(X[judged])]
            best = int(np.argmin(losses)) + 1
            return _classifier(mc, seed, best, early=False).fit(X, y)
    return _classifier(mc, seed, mc.gbm_max_iter, early=_enough(y)).fit(X, y)


def stopping_fold(fold: int, train_folds: np.ndarray) -> int:
    """The training fold that decides when fold `fold`'s trees stop: the next one after it, cyclically."""
    others = sorted(set(int(f) for f in train_folds))
    return others[fold % len(others)]


# ---- the feature table -------------------------------------------------------------------------

FEATURE_SETS = ("alignment", "asr", "alignment+asr")


def backbone_label(backbone: str) -> str:
    """How a backbone's feature block is named: a named backbone as it is, a folder by its name."""
    return backbone if backbone in NAMED_BACKBONES else Path(backbone).name


@dataclass(frozen=True)
class FeatureLayout:
    """The feature blocks a gbm config reads, in table order: the alignment features, one block
    of ASR evidence per backbone, then the task and grade codes. With alignment alone the names
    are alignment.FEATURE_NAMES, as before ASR evidence existed."""
    alignment: bool
    asr_backbones: tuple[str, ...]
    closed: bool = False       # a block of closed-vocabulary features per backbone after the ASR blocks
    closed_logp: bool = False  # then a block of the closed transcripts' log p and margins per backbone
    loops: bool = False        # then the loop features (loops.py) of each open, then each closed, transcript
    prompted: bool = False     # then the expected text's log p after a prompt of the task's words per backbone
    prompt_per_clip: bool = False  # the prompt of a task whose words do not fit: the clip's own expected words
    agreement: bool = False    # then how far each other backbone's transcripts are from the first backbone's
    fold_ear: bool = False     # then the evidence of the ear adapted inside the fold (fold_ears.py)
    ear_agreement: bool = False  # then how far the ear's transcript is from the first backbone's open one

    @classmethod
    def of(cls, mc: ModelConfig) -> "FeatureLayout":
        if mc.gbm_features not in FEATURE_SETS:
            raise ConfigError(f"--model.gbm_features: {mc.gbm_features!r} is not one of {FEATURE_SETS}")
        kinds = mc.gbm_features.split("+")
        backbones = tuple(dict.fromkeys(b.strip() for b in str(mc.asr_backbones).split(",") if b.strip()))
        if "asr" not in kinds:
            return cls(True, ())
        if not backbones:
            raise ConfigError(f"--model.gbm_features {mc.gbm_features} needs at least one --model.asr_backbones")
        labels = [backbone_label(b) for b in backbones]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"--model.asr_backbones {mc.asr_backbones!r}: two backbones share the name of "
                              f"their feature block ({', '.join(labels)})")
        if mc.asr_ear_agreement and not mc.asr_fold_ears:
            raise ConfigError("--model.asr_ear_agreement compares the fold ear's transcript with the frozen "
                              "Whisper's: it needs --model.asr_fold_ears true")
        closed = bool(mc.asr_closed_vocab)   # the log p is the closed transcript's: none without it
        return cls("alignment" in kinds, backbones, closed, closed and bool(mc.asr_closed_logp),
                   bool(mc.asr_loop_features), closed and bool(mc.asr_prompt_logp),
                   closed and bool(mc.asr_prompt_logp) and bool(mc.asr_prompt_per_clip),
                   bool(mc.asr_agreement) and len(backbones) > 1, bool(mc.asr_fold_ears),
                   bool(mc.asr_ear_agreement))

    def without_vocabulary(self) -> "FeatureLayout":
        """This layout less the blocks the task's training words shape (the closed decode and its log
        p, loops and agreement; the prompt): what the new-word trees read (new_word_rows). Its names
        are a subset of this layout's."""
        return replace(self, closed=False, closed_logp=False, prompted=False, prompt_per_clip=False)

    @property
    def names(self) -> list[str]:
        asr_names = [f"asr_{backbone_label(b)}_{n}" for b in self.asr_backbones for n in asr.FEATURE_NAMES]
        if self.closed:
            asr_names += [f"asr_{backbone_label(b)}_{n}" for b in self.asr_backbones for n in CLOSED_FEATURE_NAMES]
        if self.closed_logp:
            asr_names += [f"asr_{backbone_label(b)}_{n}" for b in self.asr_backbones for n in CLOSED_LOGP_NAMES]
        if self.loops:
            kinds = ("",) + (("closed_",) if self.closed else ())
            asr_names += [f"asr_{backbone_label(b)}_{kind}{n}" for kind in kinds for b in self.asr_backbones
                          for n in LOOP_FEATURE_NAMES]
        if self.prompted:
            asr_names += [f"asr_{backbone_label(b)}_{n}" for b in self.asr_backbones for n in PROMPT_FEATURE_NAMES]
        if self.agreement:
            kinds = ("",) + (("closed_",) if self.closed else ())
            asr_names += [f"asr_agree_{backbone_label(b)}_{kind}{n}" for b in self.asr_backbones[1:] for kind in kinds
                          for n in AGREEMENT_NAMES]
        if self.fold_ear:
            asr_names += [f"asr_ear_{n}" for n in asr.FEATURE_NAMES]
        if self.ear_agreement:
            asr_names += [f"asr_agree_ear_{n}" for n in AGREEMENT_NAMES]
        return (list(ACOUSTIC_NAMES) if self.alignment else []) + asr_names + list(CATEGORY_NAMES)

    def table(self, meta: pd.DataFrame, tasks: list[str], acoustic: tuple[np.ndarray, np.ndarray] | None,
              open_tables: list[asr.AsrTable], closed_tables: list[asr.AsrTable] = (),
              prompted_tables: list[asr.AsrTable] = (), ear_table: asr.AsrTable | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """[len(meta), len(names)] and the rows every block could be computed for. `open_tables`: the
        ASR evidence of each backbone; `closed_tables`: each backbone's closed_table (with `closed`);
        `prompted_tables`: each backbone's prompted_table (with `prompted`; its NaN rows, tasks with
        no prompt, stay usable); `ear_table`: the fold ear's evidence (with `fold_ear`)."""
        blocks, ok = [], np.ones(len(meta), bool)
        if self.alignment:
            A, a_ok = acoustic
            blocks.append(np.asarray(A, np.float64))
            ok &= a_ok
        n = len(self.asr_backbones)
        open_tables, closed_tables, prompted_tables = list(open_tables), list(closed_tables), list(prompted_tables)
        if len(open_tables) != n or len(closed_tables) != (n if self.closed else 0) \
                or len(prompted_tables) != (n if self.prompted else 0):
            raise ValueError(f"{len(open_tables)} ASR, {len(closed_tables)} closed and {len(prompted_tables)} prompted "
                             f"tables for {n} backbones (closed block: {self.closed}, prompted: {self.prompted})")
        for table in open_tables:
            blocks.append(table.X.astype(np.float64))
            ok &= table.ok
        for table in closed_tables:
            blocks.append(table.X[:, :len(CLOSED_FEATURE_NAMES)].astype(np.float64))
            ok &= table.ok
        if self.closed_logp:
            blocks += [closed_logp_block(o, c) for o, c in zip(open_tables, closed_tables)]
        if self.loops:
            texts = asr.expected_texts(meta)
            blocks += [loop_block(texts, t.transcripts, t.ok) for t in open_tables + closed_tables]
        if self.prompted:
            blocks += [prompted_block(o, p) for o, p in zip(open_tables, prompted_tables)]
        if self.agreement:
            pairs = [(open_tables[0], t) for t in open_tables[1:]]
            if self.closed:
                pairs = [p for k in range(1, n) for p in ((open_tables[0], open_tables[k]),
                                                          (closed_tables[0], closed_tables[k]))]
            blocks += [agreement_block(first, other) for first, other in pairs]
        if self.fold_ear:
            if ear_table is None:
                raise ValueError("the layout reads a fold ear's evidence: give its table")
            blocks.append(ear_table.X.astype(np.float64))
            ok &= ear_table.ok
            if self.ear_agreement:
                blocks.append(agreement_block(open_tables[0], ear_table))
        blocks.append(category_codes(meta, tasks))
        return np.hstack(blocks), ok


AGREEMENT_NAMES = ("word_edit_rate", "phone_edit_rate")


def agreement_block(first: asr.AsrTable, other: asr.AsrTable) -> np.ndarray:
    """[rows, len(AGREEMENT_NAMES)]: word and phoneme edit rates of `other`'s transcript against
    `first`'s (NaN where either has none). Two ears that hear the same words agree whatever the child
    said; a voice neither can place comes out as different words from each, so a mismatch with the
    expected text proves less there."""
    block = np.full((len(first.transcripts), len(AGREEMENT_NAMES)), np.nan)
    for row, (a, b) in enumerate(zip(first.transcripts, other.transcripts)):
        if first.ok[row] and other.ok[row]:
            c = asr.text_comparison(a, b)
            block[row] = [c["word_edit_rate"], c["phone_edit_rate"]]
    return block


@lru_cache(maxsize=4)
def evidence_model(backbone: str, device: str = "auto", threads: int = 0) -> asr.WhisperEvidence:
    """One loaded Whisper per (backbone, device, threads) in a process: training, inference and
    explanations share it (loading and hashing the weights takes seconds)."""
    return asr.WhisperEvidence(backbone, device=device, threads=threads)


def asr_evidence(backbone: str, meta: pd.DataFrame, data_dir: Path, device: str = "auto", threads: int = 0,
                 progress: bool = True, words: dict[str, list[str]] | None = None,
                 prompt: bool = False, prompt_per_clip: bool = False) -> asr.AsrTable:
    """The ASR evidence of every row of `meta` from the data folder's cache, computing (and
    caching) only the rows it lacks. With `words` (the closed vocabulary per task) the clips it
    encodes are also decoded over that vocabulary into the closed cache (closed_evidence reads it),
    and with `prompt` too their texts teacher-forced after a prompt of those words into the prompted
    cache (prompted_evidence reads it)."""
    model = evidence_model(backbone, device, threads)
    requests, on_closed, prompts, on_prompted = None, None, None, None
    if words is not None:
        path = closed_cache_path(data_dir, model)
        requests = pending_requests(meta, model, words, path)
        on_closed = lambda transcripts: add_to_closed_cache(path, transcripts)  # noqa: E731
    if words is not None and prompt:
        prompt_path = prompted_cache_path(data_dir, model)
        prompts = prompted_log_p.pending_requests(meta, model, words, prompt_path, prompt_per_clip)
        on_prompted = prompted_log_p.cache_writer(prompt_path)
    return asr.asr_table(meta, data_dir, model, asr.asr_cache_path(data_dir, model), progress=progress,
                         closed=requests, on_closed=on_closed, prompted=prompts, on_prompted=on_prompted)


def closed_evidence(backbone: str, meta: pd.DataFrame, data_dir: Path, words: dict[str, list[str]],
                    device: str = "auto", threads: int = 0, progress: bool = True) -> asr.AsrTable:
    """The closed-vocabulary features of every row of `meta` over `words` (members/gbm/closed.py),
    from and to the data folder's cache."""
    model = evidence_model(backbone, device, threads)
    return closed_table(meta, data_dir, model, words, closed_cache_path(data_dir, model), progress)


def prompted_evidence(backbone: str, meta: pd.DataFrame, data_dir: Path, words: dict[str, list[str]],
                      device: str = "auto", threads: int = 0, progress: bool = True,
                      per_clip: bool = False) -> asr.AsrTable:
    """The expected texts' log p after a prompt of `words` (members/gbm/prompted.py) for every row of
    `meta`, from and to the data folder's cache."""
    model = evidence_model(backbone, device, threads)
    return prompted_table(meta, data_dir, model, words, prompted_cache_path(data_dir, model), progress,
                          per_clip=per_clip)


def feature_table(layout: FeatureLayout, meta: pd.DataFrame, data_dir: Path, clips, refs, tasks: list[str],
                  device: str, threads: int, progress: bool, words: dict[str, list[str]] | None = None,
                  ears: FoldEars | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The trees' table for the clips of `meta` in `data_dir` and its usable rows; the alignment
    features and ASR evidence come from (and go to) that folder's caches. `words`: the closed
    decode's vocabulary per task (default: the words of `meta`'s own texts). `ears`: with the fold
    ear block, which ear reads which row (by `meta`'s fold column; FoldEars.table)."""
    acoustic = acoustic_table(meta, clips, refs, alignment_cache_path(data_dir, refs), progress) \
        if layout.alignment else None
    words = (task_words(meta) if words is None else words) if layout.closed else None
    open_tables = [asr_evidence(b, meta, Path(data_dir), device, threads, progress, words, layout.prompted,
                                layout.prompt_per_clip) for b in layout.asr_backbones]
    closed_tables = [closed_evidence(b, meta, Path(data_dir), words, device, threads, progress)
                     for b in layout.asr_backbones] if layout.closed else []
    prompted_tables = [prompted_evidence(b, meta, Path(data_dir), words, device, threads, progress,
                                         layout.prompt_per_clip)
                       for b in layout.asr_backbones] if layout.prompted else []
    ear_table = ears.table(meta, Path(data_dir), progress) if layout.fold_ear else None
    return layout.table(meta, tasks, acoustic, open_tables, closed_tables, prompted_tables, ear_table)


def ear_copy_table(layout: FeatureLayout, mc: ModelConfig, meta: pd.DataFrame, data_dir: Path, refs,
                   tasks: list[str], device: str, threads: int, progress: bool,
                   words: dict[str, list[str]] | None = None, ears: FoldEars | None = None
                   ) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """The table of the perturbed copies of `meta`'s clips (members/gbm/ear_augment.py; made and cached
    once in their own folder), its usable rows and the copies' metadata (score and fold are the
    source clip's). `words`: the closed vocabulary of the whole training table, not of `meta`'s
    rows alone (a fold's copies must decode over the words the other folds' clips do)."""
    folder, copies = ensure_copies(data_dir, meta, EarAugment(copies=mc.gbm_ear_copies, share=mc.gbm_ear_share), progress)
    clips = ensure_clip_features(folder, copies["filename"].tolist(), FeatureParams(n_mels=mc.n_mels),
                                 progress=progress)[0] if layout.alignment else None
    X, ok = feature_table(layout, copies, folder, clips, refs, tasks, device, threads, progress, words, ears)
    return X, ok, copies


def asr_weights(backbone: str, device: str = "auto") -> str:
    """What the trees' ASR features depend on: the weights' hash and the decode settings."""
    model = evidence_model(backbone, device, 0)
    return f"{asr.model_identity(model.model_dir)}_{model.settings.key()}"


def drop_empty_columns(X: np.ndarray, X_fit: np.ndarray, names: list[str], what: str
                       ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """X, X_fit and names without the columns that have no value in any row of X_fit (e.g. the
    prompted block when no task's words fit in a prompt): scikit-learn cannot bin a column without
    values, and the trees could not split on it. The checkpoint names the columns it keeps, and
    GBMModel picks them by name."""
    empty = np.isnan(X_fit).all(axis=0) if len(X_fit) else np.zeros(X.shape[1], bool)
    if not empty.any():
        return X, X_fit, names
    log.info("%s: %d features have no value in any training row, left out: %s", what, int(empty.sum()),
             ", ".join(n for n, e in zip(names, empty) if e))
    return X[:, ~empty], X_fit[:, ~empty], [n for n, e in zip(names, empty) if not e]


# ---- the member ----------------------------------------------------------

class GBMMember(Member):
    """Gradient boosting on alignment features and/or ASR evidence (model.arch = gbm): same folds,
    same fold files, no network."""
    family = "gbm"

    def environment(self) -> dict:
        try:
            import sklearn
        except ImportError:
            raise RuntimeError("model.arch=gbm needs scikit-learn: pip install scikit-learn") from None
        try:
            import ctranslate2
            return {"sklearn": sklearn.__version__, "ctranslate2": ctranslate2.__version__}
        except ImportError:  # only the ASR features need it; asking for them says how to install it
            return {"sklearn": sklearn.__version__}

    def asr_backbones(self, cfg: RunConfig) -> list[str]:
        return list(FeatureLayout.of(cfg.model).asr_backbones)

    def backbones_read(self, cfg: RunConfig) -> set[str]:
        """The ASR evidence's backbones and, with fold ears, the one whose encoder output the ear decodes."""
        layout = FeatureLayout.of(cfg.model)
        return super().backbones_read(cfg) | ({cfg.model.asr_ear_backbone} if layout.fold_ear else set())

    def prepare_shared(self, inputs: TrainingInputs, cfgs: list[RunConfig], data_dir: Path,
                       progress: bool = True) -> None:
        """Every training clip's alignment features (once per TTS and n_mels) and ASR evidence
        (once per backbone), cached in the data folder: every fold reads them."""
        layouts = [(c, FeatureLayout.of(c.model)) for c in cfgs]
        for tts, n_mels in sorted({(c.tts, c.model.n_mels) for c, lay in layouts if lay.alignment}):
            refs = inputs.banks[tts, n_mels]
            acoustic_table(inputs.meta, inputs.stores[n_mels], refs, alignment_cache_path(data_dir, refs), progress)
        words = task_words(inputs.meta)
        closed_backbones = {b for c, lay in layouts if lay.closed for b in lay.asr_backbones}
        prompted_backbones = {b for c, lay in layouts if lay.prompted for b in lay.asr_backbones}
        per_clip_backbones = {b for c, lay in layouts if lay.prompt_per_clip for b in lay.asr_backbones}
        for backbone, device in dict.fromkeys((b, asr_device(c.device)) for c, lay in layouts
                                              for b in lay.asr_backbones):
            asr_evidence(backbone, inputs.meta, Path(data_dir), device, 0, progress,
                         words if backbone in closed_backbones else None, backbone in prompted_backbones,
                         backbone in per_clip_backbones)
        for backbone, device in dict.fromkeys((b, asr_device(c.device)) for c, lay in layouts if lay.closed
                                              for b in lay.asr_backbones):
            closed_evidence(backbone, inputs.meta, Path(data_dir), words, device, 0, progress)
        for backbone, device, per_clip in dict.fromkeys((b, asr_device(c.device), lay.prompt_per_clip)
                                                        for c, lay in layouts if lay.prompted for b in lay.asr_backbones):
            prompted_evidence(backbone, inputs.meta, Path(data_dir), words, device, 0, progress, per_clip)
        self.prepare_fold_vocabularies(inputs.meta, layouts, data_dir, progress)
        folded = with_folds(inputs.meta, data_dir) if any(lay.fold_ear for _, lay in layouts) else None
        ears: dict = {}
        for c, lay in layouts:   # the fold ears and their evidence of every training clip, before the folds
            if lay.fold_ear and folded is not None and recipe_of(c.model) not in ears:
                ears[recipe_of(c.model)] = train_fold_ears(recipe_of(c.model), Path(data_dir), folded,
                                                           asr_device(c.device), 0, progress)
                ears[recipe_of(c.model)].table(folded, Path(data_dir), progress)
        for c, lay in layouts:  # the ear copies' features too, before parallel folds would race for them
            if c.model.gbm_ear_copies > 0 and (not lay.fold_ear or folded is not None):
                refs = inputs.banks[c.tts, c.model.n_mels] if lay.alignment else None
                ear_copy_table(lay, c.model, inputs.meta if folded is None else folded, Path(data_dir), refs, [],
                               asr_device(c.device), 0, progress, words, ears.get(recipe_of(c.model)))

    @staticmethod
    def prepare_fold_vocabularies(meta: pd.DataFrame, layouts, data_dir: Path, progress: bool) -> None:
        """With asr_fold_vocabulary: each fold's rows decoded over the other folds' words plus their own,
        before parallel folds would each load the Whispers for them (a fold computes what is missing)."""
        chosen = [(c, lay) for c, lay in layouts if lay.closed and c.model.asr_fold_vocabulary]
        if not chosen:
            return
        try:
            folds = load_or_create_folds(data_dir, meta, data_set_n_folds(data_dir)).to_numpy()
        except (FoldFileError, ValueError) as exc:
            log.info("held-out vocabularies left to the folds: %s", exc)
            return
        for k in sorted(set(folds.tolist())):
            rows, fold_words = meta[folds == k], task_words(meta[folds != k])
            for backbone, device in dict.fromkeys((b, asr_device(c.device)) for c, lay in chosen
                                                  for b in lay.asr_backbones):
                closed_evidence(backbone, rows, Path(data_dir), fold_words, device, 0, progress)
            for backbone, device, per_clip in dict.fromkeys((b, asr_device(c.device), lay.prompt_per_clip)
                                                            for c, lay in chosen if lay.prompted
                                                            for b in lay.asr_backbones):
                prompted_evidence(backbone, rows, Path(data_dir), fold_words, device, 0, progress, per_clip)

    def fit(self, data: FoldData, ctx: FitContext) -> FitResult:
        """Fit the trees on every fold but `data.fold`, predict it."""
        t0 = time.time()
        cfg, meta, is_valid = data.cfg, data.meta, data.is_valid
        layout = FeatureLayout.of(cfg.model)
        threads = cfg.threads if cfg.threads > 0 else torch.get_num_threads()
        words = task_words(meta)  # the closed vocabulary: every training fold's texts
        # each row read by the ear of its own fold, which never heard it (fold_ears.py)
        ears = train_fold_ears(recipe_of(cfg.model), data.data_dir, meta, asr_device(cfg.device), threads,
                               data.progress) if layout.fold_ear else None
        X, ok = feature_table(layout, meta, data.data_dir, data.clips, data.refs, data.cats.tasks,
                              asr_device(cfg.device), threads, data.progress, words, ears)
        fold_words = None
        if layout.closed and cfg.model.asr_fold_vocabulary and is_valid.any():
            # the held-out rows read what a test row reads: the training folds' words plus their own
            fold_words = task_words(meta[~is_valid])
            X[is_valid], ok[is_valid] = feature_table(layout, meta[is_valid], data.data_dir, data.clips, data.refs,
                                                      data.cats.tasks, asr_device(cfg.device), threads,
                                                      data.progress, fold_words, ears)
        names = layout.names
        y = meta["score"].to_numpy()
        fit_rows = ~is_valid & ok
        X_fit, y_fit, fold_fit = X[fit_rows], y[fit_rows], meta["fold"].to_numpy()[fit_rows]
        is_copy = np.zeros(len(y_fit), bool)
        n_copies = 0
        if cfg.model.gbm_ear_copies > 0:  # usable training clips only (a copy of an unusable row is unusable too);
            # OOF clips are never perturbed
            Xc, okc, copies = ear_copy_table(layout, cfg.model, meta[fit_rows], data.data_dir, data.refs,
                                             data.cats.tasks, asr_device(cfg.device), threads, data.progress, words,
                                             ears)
            n_copies = int(okc.sum())
            X_fit = np.vstack([X_fit, Xc[okc]])
            y_fit = np.concatenate([y_fit, copies["score"].to_numpy()[okc]])
            fold_fit = np.concatenate([fold_fit, copies["fold"].to_numpy()[okc]])
            is_copy = np.concatenate([is_copy, np.ones(n_copies, bool)])
        X, X_fit, names = drop_empty_columns(X, X_fit, names, f"fold {data.fold}")
        t_feat = time.time() - t0
        stops_on_a_fold = fold_scheme(data.data_dir, data.n_folds) in UNHEARD_SCHEMES and data.n_folds >= 3
        log.info("fold %d: %d train (%d of them ear copies) / %d valid clips, %d features (%s), data and features "
                 "ready in %.1fs", data.fold, len(y_fit), n_copies, int(is_valid.sum()), X.shape[1],
                 cfg.model.gbm_features, t_feat)
        from threadpoolctl import threadpool_limits  # comes with scikit-learn, which environment() checked
        with threadpool_limits(limits=threads):
            folds = fold_fit if stops_on_a_fold else None
            stop_fold = stopping_fold(data.fold, folds) if stops_on_a_fold else None
            clf = fit_gbm(X_fit, y_fit, cfg.model, data.seed, folds, stop_fold, is_copy)
            state = export_trees(clf)
            trees = TreeEnsemble(state, len(names))
            valid_rows = is_valid & ok
            valid_logits = trees.decision_function(X[valid_rows])
            if valid_rows.any():
                ref = clf.decision_function(X[valid_rows])
                if not np.allclose(valid_logits, ref, rtol=0, atol=1e-6):
                    raise RuntimeError(f"exported trees disagree with scikit-learn by "
                                       f"{np.abs(valid_logits - ref).max():.2e}")
            new_word = None
            if cfg.model.asr_new_word_trees and layout.closed:
                small = prompted_log_p.tasks_that_fit(evidence_model(layout.asr_backbones[0], asr_device(cfg.device)),
                                                      words)
                new_word = NewWordTrees.fit(layout, names, X_fit, y_fit, cfg.model, data.seed, folds, stop_fold,
                                            is_copy, small)
            if new_word is not None:  # their logits on every held-out row: the rows they score, and their log loss
                new_word_valid = new_word.logits(X[valid_rows], names)
                valid_meta = meta[valid_rows]
                new_valid = new_word.scores(valid_meta, new_word_rows(valid_meta, fold_words)) \
                    if fold_words is not None else np.zeros(len(valid_meta), bool)
                valid_logits = np.where(new_valid, new_word_valid, valid_logits)
        n_iter = int(clf.n_iter_)
        history = pd.DataFrame({"step": np.arange(len(clf.train_score_)), "train_logloss": -clf.train_score_})
        if len(getattr(clf, "validation_score_", [])):
            history["internal_valid_logloss"] = -clf.validation_score_
        atomic_csv(history, ctx.paths.metrics)
        stopped = f"early stop at iteration {n_iter} of {cfg.model.gbm_max_iter}" \
            if n_iter < cfg.model.gbm_max_iter else ""
        if stopped and stop_fold is not None:
            stopped += f" (best on training fold {stop_fold}, then refit on all training folds)"
        summary = {"best_epoch": 1, "best_step": n_iter, "epochs_run": 1, "updates": n_iter, "stopped": stopped,
                   "n_train": len(y_fit), "n_ear_copies": n_copies, "n_trees": trees.n_trees, "n_features": len(names),
                   "feature_seconds": t_feat}
        payload = {"feature_names": names, "align_version": ALIGN_VERSION, "n_iter": n_iter, "state_dict": state}
        if layout.asr_backbones:
            payload |= {"asr_version": asr.ASR_VERSION,
                        "asr_weights": [asr_weights(b, asr_device(cfg.device)) for b in layout.asr_backbones]}
        if layout.closed:
            payload["closed_words"] = json.dumps(words)
        if ears is not None:   # the ear of every training fold reads the test rows: kept beside the checkpoints
            payload |= ear_payload(ears, ctx.paths.assets)
        if new_word is not None:
            payload |= new_word.payload()
            # the held-out rows they scored (only with asr_fold_vocabulary: otherwise the vocabulary holds
            # every training text, so no held-out row has a new word), and their log loss on every held-out row
            summary |= {"n_new_word_trees": new_word.trees.n_trees, "new_word_tasks": new_word.tasks,
                        "n_valid_new_word_rows": int(new_valid.sum()),
                        "valid_logloss_new_word_trees": log_loss(y[valid_rows], sigmoid(new_word_valid))}
        log.info("%s: %d trees", ctx.paths.stem, trees.n_trees)
        return FitResult(dict(zip(meta.loc[valid_rows, "filename"], valid_logits)), payload, summary)

    def load(self, ck: dict, device=None) -> "GBMPredictor":
        try:
            cfg = RunConfig.from_dict(json.loads(ck["config"]))
            cats = Categories(list(ck["tasks"]), list(ck["grades"]))
            layout = FeatureLayout.of(cfg.model)
            if cfg.model.asr_new_word_trees and layout.closed and "new_word_state_dict" not in ck:
                raise CheckpointError("its config asks for new-word trees but it holds none: retrain the fold")
            return GBMPredictor(GBMModel(ck, layout), cfg, cats, json.loads(ck["priors"]))
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:  # CheckpointError is a RuntimeError
            raise CheckpointError(f"not a usable gbm checkpoint ({exc})") from exc


# ---- inference ---------------------------------------------------------------------------------

class GBMModel:
    """A loaded gbm checkpoint: trees + the feature layout they were trained on."""

    max_frames = None

    def __init__(self, ck: dict, layout: FeatureLayout):
        names = list(ck["feature_names"])
        if layout.alignment and int(ck.get("align_version", -1)) != ALIGN_VERSION:
            raise CheckpointError(f"alignment features version {ck.get('align_version')} != {ALIGN_VERSION} "
                                  f"of this code: retrain the fold")
        if layout.asr_backbones and int(ck.get("asr_version", -1)) != asr.ASR_VERSION:
            raise CheckpointError(f"ASR evidence version {ck.get('asr_version')} != {asr.ASR_VERSION} "
                                  f"of this code: retrain the fold")
        expected = layout.names
        unknown = [n for n in names if n not in expected]
        if unknown:
            raise CheckpointError(f"trained on features its config does not make: {unknown[:5]}")
        self.layout = layout
        self.feature_names = names
        self.columns = [expected.index(n) for n in names]
        self.trees = TreeEnsemble(ck["state_dict"], len(names))
        self.tasks = list(ck["tasks"])
        self.asr_weights = [str(w) for w in ck.get("asr_weights", [])]
        if layout.closed and "closed_words" not in ck:
            raise CheckpointError("its config asks for closed-vocabulary features but it holds no training "
                                  "vocabulary: retrain the fold")
        self.closed_words: dict[str, list[str]] = json.loads(ck["closed_words"]) if layout.closed else {}
        self.fold_ear = checkpoint_ear(ck) if layout.fold_ear else None   # the ear of every fold, beside it
        self.new_word = NewWordTrees.load(ck, layout, names) if "new_word_state_dict" in ck else None

    def predict(self, meta: pd.DataFrame, acoustic: tuple[np.ndarray, np.ndarray] | None,
                open_tables: list[asr.AsrTable] = (), closed_tables: list[asr.AsrTable] = (),
                prompted_tables: list[asr.AsrTable] = (), new_rows: np.ndarray | None = None,
                ear_table: asr.AsrTable | None = None) -> np.ndarray:
        """Logits for the rows of `meta` (NaN where a feature block could not be computed), from
        their precomputed features (shared by every gbm model; FeatureLayout.table's tables).
        `new_rows`: closed.new_word_rows of `meta` over this fold's training words (computed here when
        not given; the same for every fold of a variant, so GBMPredictor shares it)."""
        X, ok = self.layout.table(meta, self.tasks, acoustic, open_tables, closed_tables, prompted_tables, ear_table)
        X = X[:, self.columns]
        out = np.full(len(meta), np.nan)
        out[ok] = self.trees.decision_function(X[ok])
        if self.new_word is not None:
            new_rows = new_word_rows(meta, self.closed_words) if new_rows is None else new_rows
            new = ok & self.new_word.scores(meta, new_rows)
            if new.any():
                out[new] = self.new_word.logits(X[new], self.feature_names)
        return out


class NewWordTrees:
    """The trees a row whose expected text has a word its task's training texts lack is scored with
    (model.asr_new_word_trees), for the tasks whose training words fit in a prompt (small closed
    vocabularies: prompted.tasks_that_fit): fitted beside the fold's trees on the same rows and
    early-stopping fold, on the columns of FeatureLayout.without_vocabulary. The closed decode and the
    task-word prompt can offer such a row its training words and its own, not the words a child might
    say instead, so the trees that learned to trust a matching closed transcript would trust it there
    too. A sentence task's vocabulary is the open-ended words of all its texts, and there the fold's
    trees scored rows with new words better (measured on FSDD's words never trained on and the
    children's held-out vocabularies: docs/benchmarks.md)."""

    def __init__(self, names: list[str], state: dict, tasks: list[str]):
        self.names = list(names)
        self.trees = TreeEnsemble(state, len(self.names))
        self.state = state
        self.tasks = list(tasks)

    def scores(self, meta: pd.DataFrame, new_rows: np.ndarray) -> np.ndarray:
        """Per row of `meta`: is it one these trees score, a row with a new word (`new_rows`:
        closed.new_word_rows of `meta`) in one of their tasks? Reads the row alone."""
        return new_rows & meta["task"].astype(str).isin(self.tasks).to_numpy()

    @classmethod
    def fit(cls, layout: FeatureLayout, names: list[str], X_fit: np.ndarray, y_fit: np.ndarray, mc: ModelConfig,
            seed: int, folds, stop_fold, is_copy, tasks: list[str]) -> "NewWordTrees":
        keep = set(layout.without_vocabulary().names)
        mine = [n for n in names if n in keep]
        cols = [names.index(n) for n in mine]
        clf = fit_gbm(X_fit[:, cols], y_fit, mc, seed, folds, stop_fold, is_copy)
        return cls(mine, export_trees(clf), tasks)

    @classmethod
    def load(cls, ck: dict, layout: FeatureLayout, names: list[str]) -> "NewWordTrees":
        mine = list(ck["new_word_feature_names"])
        missing = [n for n in mine if n not in names]
        if missing or any(n not in layout.without_vocabulary().names for n in mine):
            raise CheckpointError(f"its new-word trees read features outside its vocabulary-free columns: "
                                  f"{(missing or mine)[:5]}")
        return cls(mine, ck["new_word_state_dict"], json.loads(ck["new_word_tasks"]))

    def payload(self) -> dict:
        return {"new_word_feature_names": self.names, "new_word_state_dict": self.state,
                "new_word_tasks": json.dumps(self.tasks)}

    def logits(self, X: np.ndarray, names: list[str]) -> np.ndarray:
        """Logits of the rows of X, whose columns are `names` (the fold's trees' columns)."""
        return self.trees.decision_function(X[:, [names.index(n) for n in self.names]])


assert FEATURE_NAMES == ACOUSTIC_NAMES + CATEGORY_NAMES


@dataclass
class GBMPredictor:
    """A loaded gbm fold; the test rows' alignment features and ASR evidence are computed for the
    first gbm fold that needs them and reused by the others (TestInputs.shared)."""
    model: GBMModel
    cfg: RunConfig
    cats: Categories
    priors: dict

    def predict(self, inputs: TestInputs) -> np.ndarray:
        layout = self.model.layout
        acoustic = None
        if layout.alignment:
            n_mels = self.cfg.model.n_mels
            key = ("gbm alignment", self.cfg.tts, n_mels)
            if key not in inputs.shared:
                refs = inputs.refs(self.cfg.tts, n_mels)
                inputs.shared[key] = acoustic_table(inputs.rows, inputs.clips(n_mels), refs,
                                                    alignment_cache_path(inputs.data_dir, refs), inputs.progress)
            acoustic = inputs.shared[key]
        device = asr_device(inputs.device)
        if self.model.asr_weights:
            here = [asr_weights(b, device) for b in layout.asr_backbones]
            if here != self.model.asr_weights:
                raise CheckpointError(f"its ASR features came from Whisper weights/settings {self.model.asr_weights}, "
                                      f"these are {here}: retrain the fold with these weights")
        # the closed vocabulary: the training words; each row adds its own (closed.row_vocabularies), never
        # another row's
        words = self.model.closed_words if layout.closed else None
        rows, folder, progress = inputs.rows, inputs.data_dir, inputs.progress

        def shared(key, compute):   # computed for the first gbm fold that needs it, reused by the others
            if key not in inputs.shared:
                inputs.shared[key] = compute()
            return inputs.shared[key]
        open_tables = [shared(("gbm asr", b), lambda b=b: asr_evidence(b, rows, folder, device, 0, progress, words,
                                                                        layout.prompted, layout.prompt_per_clip))
                       for b in layout.asr_backbones]
        closed_tables = [shared(("gbm closed", b, json.dumps(words)),
                                lambda b=b: closed_evidence(b, rows, folder, words, device, 0, progress))
                         for b in layout.asr_backbones] if layout.closed else []
        prompted_tables = [shared(("gbm prompted", b, json.dumps(words), layout.prompt_per_clip),
                                  lambda b=b: prompted_evidence(b, rows, folder, words, device, 0, progress,
                                                                layout.prompt_per_clip))
                           for b in layout.asr_backbones] if layout.prompted else []
        new_rows = shared(("gbm new-word rows", json.dumps(words)), lambda: new_word_rows(rows, words)) \
            if self.model.new_word is not None else None
        ear_table = None
        if layout.fold_ear:   # the ear of every training fold reads every test row
            ear_table = shared_ear_table(recipe_of(self.cfg.model), self.model.fold_ear, inputs)
        out = np.full(len(inputs.meta), np.nan)
        out[inputs.rows.index] = self.model.predict(inputs.rows, acoustic, open_tables, closed_tables,
                                                    prompted_tables, new_rows, ear_table)
        return out
