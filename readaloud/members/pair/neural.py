"""What the neural families share: building the network for a fold, its checkpoint payload,
loading it back, and predicting logits in size-bucketed batches.

A neural family is a `NeuralMember` subclass naming its network class (`model_class`); the
network computes its own training loss (`model.loss(outputs, batch) -> (loss, parts)`), so the
shared loop (pipeline/trainer.py, reached through FitContext.train_network) needs no branch
per family.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ...checkpoints import CheckpointError
from ...config import RunConfig
from ...prep.dataset import Categories, PairDataset, bucket_batches, to_device
from ...prep.text_negatives import with_text_negatives
from ...text import Vocab
from ..base import FitContext, FitResult, FoldData, Member, TestInputs
from .encoder import SpeechEncoderModel, build_network, whisper_config_dict
from .frozen import FrozenPairDataset, frozen_cache_usable


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} asked for, but no CUDA device is available")
    return torch.device(name)


def autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


@torch.inference_mode()
def predict_logits(model, dataset: PairDataset, device: torch.device, batch_max_frames: int,
                   max_batch: int = 64, progress: bool = False) -> np.ndarray:
    """Logits for every item of `dataset`, in its order."""
    model.eval()
    out = np.zeros(len(dataset), dtype=np.float64)
    batches = bucket_batches(dataset.lengths, batch_max_frames, max_batch, shuffle=False)
    for idx in tqdm(batches, desc="predict", disable=not progress, leave=False):
        batch = to_device(dataset.collate([dataset.item(i) for i in idx]), device)
        with autocast(device):
            out[idx] = model(batch)["logits"].float().cpu().numpy()
    return out


def pair_dataset(meta, clips, refs, vocab: Vocab, cats: Categories, model: SpeechEncoderModel,
                 cfg: RunConfig, cache_frozen: bool = True, progress: bool = True) -> PairDataset:
    """The rows of `meta` as the network reads them: the frozen layers' cached outputs when the
    pair has frozen layers and no input augmentation (and `cache_frozen`), else log-mels."""
    if cache_frozen and model.reads_frozen_halves and frozen_cache_usable(cfg):
        return FrozenPairDataset(meta, clips, refs, vocab, cats, model, cfg.model.pause_frames, progress)
    return PairDataset(meta, clips, refs, vocab, cats, model.max_frames, cfg.model.pause_frames,
                       model.frames_per_position)


@dataclass
class NeuralPredictor:
    """A loaded neural fold."""
    model: SpeechEncoderModel
    cfg: RunConfig
    vocab: Vocab
    cats: Categories
    priors: dict
    device: torch.device

    def dataset(self, inputs: TestInputs) -> PairDataset:
        """The test rows as this fold's network reads them."""
        n_mels = self.cfg.model.n_mels
        # test clips are seen once per fold: frozen layers run per batch, nothing is cached for them
        return pair_dataset(inputs.rows, inputs.clips(n_mels), inputs.refs(self.cfg.tts, n_mels), self.vocab,
                            self.cats, self.model, self.cfg, cache_frozen=False)

    def predict(self, inputs: TestInputs) -> np.ndarray:
        ds = self.dataset(inputs)
        logits = predict_logits(self.model, ds, self.device, self.cfg.data.batch_max_frames,
                                progress=inputs.progress)
        return inputs.scatter(logits, ds.meta["filename"])


class NeuralMember(Member):
    """A family whose model is a network over the cached log-mels, trained by the shared loop."""
    model_class: ClassVar[type[SpeechEncoderModel]]

    def fit(self, data: FoldData, ctx: FitContext) -> FitResult:
        return ctx.train_network(self, data, ctx)

    def build(self, data: FoldData) -> tuple[SpeechEncoderModel, Vocab]:
        """A fresh network for the fold (from the backbone when the config names one), and its vocabulary."""
        cfg = data.cfg
        vocab = Vocab.build(data.meta["expected_text"], cfg.model.ctc_unit)
        model = build_network(self.model_class, cfg.model, len(data.cats.tasks), len(data.cats.grades), len(vocab))
        self.warm_start(model, vocab, cfg)
        return model, vocab

    def training_rows(self, data: FoldData) -> pd.DataFrame:
        """The fold's training rows, and with `--text_negatives N` N changed texts of each row scored 1
        (prep/text_negatives.py; run_fold has refused the option for a family that cannot take them)."""
        n = data.cfg.data.text_negatives
        return with_text_negatives(data.train_meta, n, data.seed) if n > 0 else data.train_meta

    def dataset(self, meta, data: FoldData, model: SpeechEncoderModel, vocab: Vocab):
        """The rows of `meta` (a part of the fold) as this family's network reads them in training."""
        return pair_dataset(meta, data.clips, data.refs, vocab, data.cats, model, data.cfg)

    def warm_start(self, model: SpeechEncoderModel, vocab: Vocab, cfg: RunConfig) -> None:
        """Start the new heads from what the backbone brings, if the family knows how."""

    def payload(self, model: SpeechEncoderModel, vocab: Vocab) -> dict:
        """The family's part of the checkpoint."""
        return {"whisper_config": json.dumps(whisper_config_dict(model)), "vocab": json.dumps(vocab.to_dict()),
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}

    def load(self, ck: dict, device) -> NeuralPredictor:
        try:
            cfg = RunConfig.from_dict(json.loads(ck["config"]))
            vocab = Vocab.from_dict(json.loads(ck["vocab"]))
            cats = Categories(list(ck["tasks"]), list(ck["grades"]))
            model = build_network(self.model_class, cfg.model, len(cats.tasks), len(cats.grades), len(vocab),
                                  whisper_config=json.loads(ck["whisper_config"]))
            model.load_state_dict(ck["state_dict"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"not a usable {self.family} checkpoint ({exc})") from exc
        model.to(device).eval()
        return NeuralPredictor(model, cfg, vocab, cats, json.loads(ck["priors"]), device)
