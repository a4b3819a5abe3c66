"""The member protocol: the few operations every model family of the ensemble implements.

A family (the pair classifier, the encoder-decoder, gradient boosting on alignment features,
and whatever comes next) is one module with a `Member` subclass, named in registry.py. It
- fits one fold: `fit(FoldData, FitContext) -> FitResult` (the held-out logits, its part of
  the checkpoint, its history and summary extras); everything around that (start and resume,
  logging, the OOF table, summary, atomic checkpoint, plots) is `pipeline.fold_run.run_fold`'s;
- loads a checkpoint: `load(checkpoint dict, device) -> Predictor`;
- predicts logits for the test rows: `Predictor.predict(TestInputs)`, NaN where it cannot;
- optionally fills caches its parallel folds share before they start (`prepare_shared`).
A neural family asks the context for the shared network loop (`FitContext.train_network`),
so no member module imports the training loop and inference never does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Protocol

import numpy as np
import pandas as pd

from ..config import ConfigError, RunConfig
from ..features import FeatureParams, FeatureStore
from ..layout import FoldPaths
from ..prep.dataset import Categories
from ..prep.prepare import TrainingInputs, ensure_clip_features, ensure_references
from ..prep.references import ReferenceBank


@dataclass
class FoldData:
    """One fold's training data, as run_fold loads it for every family alike."""
    variant: str
    fold: int
    n_folds: int
    cfg: RunConfig
    data_dir: Path
    tts_dir: Path
    meta: pd.DataFrame          # every training clip, with its `fold` column
    refs: ReferenceBank
    clips: FeatureStore
    bad: dict[str, str]         # training clips that could not be decoded: {filename: why}
    cats: Categories
    priors: dict[str, float]    # the training folds' task priors
    progress: bool = True

    @property
    def is_valid(self) -> np.ndarray:
        return (self.meta["fold"] == self.fold).to_numpy()

    @property
    def train_meta(self) -> pd.DataFrame:
        return self.meta[~self.is_valid]

    @property
    def valid_meta(self) -> pd.DataFrame:
        return self.meta[self.is_valid]

    @property
    def seed(self) -> int:
        """The fold's seed: the config's, made different per fold."""
        return self.cfg.seed * 1000 + self.fold


@dataclass
class FitResult:
    """What a family's fit hands back to run_fold."""
    valid_logits: dict[str, float]  # held-out filename -> logit; a row left out gets its task prior
    payload: dict                   # the family's part of the checkpoint: weights + what `load` needs
    summary: dict                   # best_epoch, best_step, epochs_run, updates, stopped, n_train, extras
    curves: bool = False            # metrics.csv holds per-evaluation curves worth plotting


@dataclass
class FitContext:
    """How this run of a fold was asked for, and the services run_fold offers a family."""
    paths: FoldPaths
    restart: bool = False
    resume: Path | None = None
    quiet: bool = False
    progress: bool = True
    # the shared neural loop (pipeline.trainer.train_network): (member, data, context) -> result
    train_network: Callable[["Member", FoldData, "FitContext"], FitResult] | None = None


class Predictor(Protocol):
    """A loaded fold checkpoint of any family."""
    cfg: RunConfig
    cats: Categories
    priors: dict
    model: object

    def predict(self, inputs: "TestInputs") -> np.ndarray:
        """Logits for every row of inputs.meta (NaN where this model cannot predict the row)."""
        ...


class Member:
    """A model family. Subclasses set `family` (the value of config model.arch) and implement
    fit and load; registry.py maps the family name to the class."""
    family: ClassVar[str] = ""
    takes_text_negatives: ClassVar[bool] = False   # trains on rows with made texts (prep/text_negatives.py)

    def check_options(self, cfg: RunConfig) -> None:
        """Refuse, before any work, an option this family cannot honour. `--text_negatives` needs a
        family that reads nothing made in advance for a text (a TTS reference, ASR evidence)."""
        n = cfg.data.text_negatives
        if n > 0 and not self.takes_text_negatives:
            raise ConfigError(f"--text_negatives {n}: model.arch {self.family} reads what is made in advance for "
                              f"each expected text (a TTS reference or ASR evidence) and cannot take made texts; "
                              f"give the option to the whisperdec family alone (--models model8decoder)")

    def environment(self) -> dict:
        """Versions of what this family needs beyond torch (saved in the fold's summary);
        raises with the install command when it is missing."""
        return {}

    def prepare_shared(self, inputs: TrainingInputs, cfgs: list[RunConfig], data_dir: Path,
                       progress: bool = True) -> None:
        """Fill caches this family's folds all read, once, before parallel jobs start."""

    def asr_backbones(self, cfg: RunConfig) -> list[str]:
        """The Whisper backbones whose ASR evidence (members/gbm/evidence.py) a model of this config reads;
        infer.py --explain takes its per-word evidence from the first of a shipped member."""
        return []

    def backbones_read(self, cfg: RunConfig) -> set[str]:
        """Every Whisper backbone a model of this config reads at inference (make_submission.py ships
        their weights): its own backbone and its ASR evidence's."""
        return {b for b in [cfg.model.backbone, *self.asr_backbones(cfg)] if b}

    def fit(self, data: FoldData, ctx: FitContext) -> FitResult:
        raise NotImplementedError

    def load(self, ck: dict, device) -> Predictor:
        raise NotImplementedError


@dataclass
class TestInputs:
    """The rows to predict and their inputs, made once and shared by every checkpoint: the
    clip features of every n_mels and the references of every (TTS, n_mels) asked for, and
    `shared`, where a family keeps what its folds compute alike (gbm: alignment features)."""
    meta: pd.DataFrame          # every row, in the submission's order (RangeIndex)
    usable: np.ndarray          # rows with metadata, a decodable clip and an expected text
    data_dir: Path
    tts_dir: Path
    device: object = None
    progress: bool = True
    shared: dict = field(default_factory=dict)
    _clips: dict = field(default_factory=dict)
    _refs: dict = field(default_factory=dict)

    @property
    def rows(self) -> pd.DataFrame:
        return self.meta[self.usable]

    def clips(self, n_mels: int) -> FeatureStore:
        if n_mels not in self._clips:
            self._clips[n_mels], _ = ensure_clip_features(self.data_dir, self.rows["filename"].tolist(),
                                                          FeatureParams(n_mels=n_mels), progress=self.progress)
        return self._clips[n_mels]

    def refs(self, tts: str, n_mels: int) -> ReferenceBank:
        if (tts, n_mels) not in self._refs:
            self._refs[tts, n_mels] = ensure_references(self.tts_dir, tts, self.rows["expected_text"].unique(),
                                                        FeatureParams(n_mels=n_mels), progress=self.progress)
        return self._refs[tts, n_mels]

    def scatter(self, row_logits: np.ndarray, filenames) -> np.ndarray:
        """Logits for every row of meta from those of the usable rows named by `filenames`."""
        out = np.full(len(self.meta), np.nan)
        rows = self.rows
        pos = rows.index[rows["filename"].isin(list(filenames))]
        out[pos] = row_logits
        return out
