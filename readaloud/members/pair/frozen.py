"""Frozen lower encoder layers, computed once: their outputs per half, cached in float16.

With `freeze_layers = N` the conv stem and the lowest N layers of a pretrained Whisper never
change, and the pair runs them on each half alone (members/pair/encoder.py `encode_pair`): the
reference half (TTS reference + pause) per expected text, the response half per clip, each at
positions from 0 as if it were its own clip. So their outputs are a pure function of the half,
and each epoch only has to run the trainable layers above them and the heads.

The outputs live in FeatureStores (memmap + index, appended under a lock, index written
atomically) beside the stores they are computed from: the response halves next to the clip
features (<data>/cache), the reference halves next to the references (<tts_dir>/<engine>).
A store's name carries the hash of the frozen weights, N and the feature key, so another
backbone, another N or other features never read stale outputs.

Input augmentation (SpecAugment, the log-mel augmenter) changes the frozen part's input every
epoch, so a config with any of it runs the frozen part per batch instead (no gradient).
A response longer than fits beside its reference in Whisper's 30 s window is cropped after the
frozen layers (they saw the whole clip); the per-batch path crops it before them.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ...config import RunConfig
from ...features import FeatureStore
from ...prep.dataset import PairDataset
from ...text import normalise_text
from ...whisper.encoding import weights_key
from .encoder import SpeechEncoderModel

log = logging.getLogger("readaloud.train")
FROZEN_CACHE_VERSION = 1


def frozen_cache_usable(cfg: RunConfig) -> bool:
    """Frozen layers whose input is the same every epoch (no input augmentation)."""
    dc = cfg.data
    augmented = (dc.aug_prob > 0 and bool(dc.aug_warp or dc.aug_stretch or dc.aug_noise_snr or dc.aug_gain_db
                                          or dc.aug_cutouts)) or dc.spec_time_masks > 0 or dc.spec_freq_masks > 0
    return cfg.model.freeze_layers > 0 and not augmented


def frozen_weights_key(model: SpeechEncoderModel) -> str:
    """A hash of the frozen modules' weights: any other backbone or layer count is another key."""
    return weights_key([(f"{i}.", module) for i, module in enumerate(model.frozen_modules())])


@dataclass(frozen=True)
class FrozenParams:
    """What a cached row means (FeatureStore keys its files on `key()`)."""
    width: int                 # d_model of the encoder
    layers: int                # freeze_layers
    weights_key: str           # frozen_weights_key
    feature_key: str           # the log-mel features' key
    frames_per_position: int
    pause_frames: int          # reference halves only (0 for responses)
    max_frames: int
    version: int = FROZEN_CACHE_VERSION

    @property
    def n_mels(self) -> int:
        """The row width, under the name FeatureStore reads."""
        return self.width

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


class FrozenCache:
    """The frozen part's outputs for the reference halves and response halves of one model."""

    def __init__(self, model: SpeechEncoderModel, clips: FeatureStore, refs, pause_frames: int):
        self.model, self.clips, self.refs = model, clips, refs
        m = model.frames_per_position
        self.step, self.pause = m, -(-pause_frames // m) * m
        weights = frozen_weights_key(model)
        common = dict(width=model.whisper_config.d_model, layers=model.cfg.freeze_layers, weights_key=weights,
                      frames_per_position=m, max_frames=model.max_frames)
        tag = f"frozen{model.cfg.freeze_layers}_{weights}"
        self.ref_store = FeatureStore(refs.store.root, f"{refs.store.name}_{tag}",
                                      FrozenParams(feature_key=refs.params.key(), pause_frames=self.pause, **common))
        self.clip_store = FeatureStore(clips.root, f"{clips.name}_{tag}",
                                       FrozenParams(feature_key=clips.params.key(), pause_frames=0, **common))

    def reference_half(self, text: str) -> np.ndarray:
        """[reference | pause] frames as PairDataset lays them out (float32)."""
        ref = self.refs.features(text)
        n = min(ref.shape[0], self.model.max_frames // 3) // self.step * self.step
        ref = ref[:n].astype(np.float32)
        floor = float(ref.min()) if ref.size else -1.0
        return np.concatenate([ref, np.full((self.pause, ref.shape[1]), floor, np.float32)])

    def response_half(self, filename: str) -> np.ndarray:
        """The whole response in whole positions, as PairDataset lays it out when it fits (float32)."""
        resp = self.clips.get(filename)
        n = max(resp.shape[0] // self.step * self.step, self.step)
        resp = resp[:n].astype(np.float32)
        if resp.shape[0] < n:
            resp = np.concatenate([resp, np.full((n - resp.shape[0], resp.shape[1]),
                                                 resp.min() if resp.size else -1.0, np.float32)])
        return resp

    def ensure(self, texts, filenames, progress: bool = True, budget_frames: int = 6000) -> int:
        """Compute and store every half not cached yet; returns how many were computed."""
        texts = sorted({normalise_text(t) for t in texts} - set(self.ref_store.keys()))
        texts = [t for t in texts if t in self.refs.store]
        names = [f for f in dict.fromkeys(filenames) if f not in self.clip_store and f in self.clips]
        made = 0
        for store, keys, half in ((self.ref_store, texts, self.reference_half),
                                  (self.clip_store, names, self.response_half)):
            if keys:
                made += store.add_many(self._outputs(keys, half, budget_frames, progress))
        return made

    def _outputs(self, keys: list[str], half, budget_frames: int, progress: bool):
        """(key, float16 [positions, D]) for each key, computed in length-sorted batches."""
        halves = {k: half(k) for k in keys}
        order = sorted(keys, key=lambda k: halves[k].shape[0])
        model, was_training = self.model, self.model.training
        device = next(model.parameters()).device
        model.eval()
        bar = tqdm(total=len(order), desc="frozen layers", unit="half", disable=not progress, leave=False)
        try:
            i = 0
            while i < len(order):
                j = i + 1
                while j < len(order) and halves[order[j]].shape[0] * (j - i + 1) <= budget_frames:
                    j += 1
                batch = order[i:j]
                longest = halves[batch[-1]].shape[0]
                feats = np.zeros((len(batch), longest, halves[batch[0]].shape[1]), np.float32)
                mask = np.zeros((len(batch), longest), bool)
                for b, k in enumerate(batch):
                    feats[b, : halves[k].shape[0]] = halves[k]
                    mask[b, : halves[k].shape[0]] = True
                with torch.inference_mode():
                    hidden, pos_mask = model.encode_lower(torch.from_numpy(feats).to(device),
                                                          torch.from_numpy(mask).to(device))
                hidden = hidden.float().cpu().numpy()
                for b, k in enumerate(batch):
                    yield k, hidden[b, : int(pos_mask[b].sum())].astype(np.float16)
                bar.update(len(batch))
                i = j
        finally:
            bar.close()
            model.train(was_training)


class FrozenPairDataset(PairDataset):
    """PairDataset whose items are the frozen layers' cached outputs ([positions, D]), not log-mels.

    Same rows, layout and lengths (in frames, so batches are the same as the log-mel path's);
    collate marks the batch `frozen_hidden` and the model runs only its trainable layers.
    """

    def __init__(self, meta, clips, refs, vocab, cats, model: SpeechEncoderModel, pause_frames: int,
                 progress: bool = True):
        super().__init__(meta, clips, refs, vocab, cats, model.max_frames, pause_frames, model.frames_per_position)
        self.cache = FrozenCache(model, clips, refs, pause_frames)
        made = self.cache.ensure(self.meta["expected_text"], self.meta["filename"], progress=progress)
        if made:
            log.info("frozen layers: %d halves computed into %s and %s", made, self.cache.ref_store.data_path,
                     self.cache.clip_store.data_path)

    def item(self, i: int) -> dict:
        row = self.meta.iloc[i]
        ref_n, pause, resp_n, _ = self._layout(i)
        m = self.step
        ref = self.cache.ref_store.get(normalise_text(row["expected_text"]))[: (ref_n + pause) // m]
        resp = self.cache.clip_store.get(row["filename"])[: resp_n // m]
        feats = np.concatenate([ref, resp]).astype(np.float32)
        start = (ref_n + pause) // m
        return {"feats": feats, "floor": 0.0, "ref_n": ref_n // m, "resp_start": start, "resp_n": resp_n // m,
                "ref_pos": ref_n // m, "resp_start_pos": start, "resp_pos": resp_n // m,
                "task": self.task_ids[i], "grade": self.grade_ids[i], "target": self.targets[i],
                "label": None if self.labels is None else self.labels[i], "frozen_hidden": True, **self.extras(i)}
