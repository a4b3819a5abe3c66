"""Pairs [reference | pause | response] from cached features, batched by size.

Batches are filled from length buckets up to a frame budget (padded frames per batch), so
a 1 s clip is never padded to a 20 s one and every batch costs about the same.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..features import FeatureStore
from .references import ReferenceBank
from ..text import Vocab, normalise_text

log = logging.getLogger(__name__)
UNKNOWN = 0


@dataclass
class Categories:
    """Task and grade values seen in training (id 0 is 'unknown')."""
    tasks: list[str]
    grades: list[str]

    @classmethod
    def from_meta(cls, meta: pd.DataFrame) -> "Categories":
        return cls(sorted(meta["task"].unique().tolist()), sorted(meta["grade"].unique().tolist()))

    def task_id(self, t: str) -> int:
        return self.tasks.index(t) + 1 if t in self.tasks else UNKNOWN

    def grade_id(self, g: str) -> int:
        return self.grades.index(g) + 1 if g in self.grades else UNKNOWN


class PairDataset:
    """Items of one split; features come from the clip store and the reference bank."""

    def __init__(self, meta: pd.DataFrame, clips: FeatureStore, refs: ReferenceBank, vocab: Vocab,
                 cats: Categories, max_frames: int, pause_frames: int, frames_per_position: int = 2):
        usable = meta["filename"].map(lambda f: f in clips) & meta["expected_text"].map(
            lambda t: normalise_text(t) in refs.store)
        self.skipped = meta.loc[~usable, "filename"].tolist()
        self.meta = meta.loc[usable].reset_index(drop=True)
        self.clips, self.refs, self.vocab, self.cats = clips, refs, vocab, cats
        self.max_frames, self.pause, self.step = max_frames, pause_frames, frames_per_position
        self.targets = [np.array(vocab.encode(t), dtype=np.int64) for t in self.meta["expected_text"]]
        self.task_ids = np.array([cats.task_id(t) for t in self.meta["task"]], dtype=np.int64)
        self.grade_ids = np.array([cats.grade_id(g) for g in self.meta["grade"]], dtype=np.int64)
        self.labels = self.meta["score"].to_numpy(np.float32) if "score" in self.meta else None
        self.ref_frames = np.array([refs.length(t) for t in self.meta["expected_text"]], dtype=np.int64)
        self.clip_frames = np.array([clips.length(f) for f in self.meta["filename"]], dtype=np.int64)
        self.lengths = np.array([self._layout(i)[3] for i in range(len(self.meta))], dtype=np.int64)
        self.ear: np.ndarray | None = None   # [rows, n] what the fold ear hears of each row (members/pair/ear.py)

    def __len__(self) -> int:
        return len(self.meta)

    def attach_ear(self, rows: np.ndarray) -> "PairDataset":
        """Give every item its ear vector (`rows`: one per row of self.meta, in its order)."""
        if len(rows) != len(self.meta):
            raise ValueError(f"{len(rows)} ear vectors for {len(self.meta)} rows")
        self.ear = np.asarray(rows, np.float32)
        return self

    def extras(self, i: int) -> dict:
        """What an item carries besides its features: the ear's vector when one is attached."""
        return {} if self.ear is None else {"ear": self.ear[i]}

    def collate(self, items: list[dict], spec_augment=None, rng: np.random.Generator | None = None) -> dict:
        """Items of this dataset as one batch (a dataset of other items brings its own)."""
        return collate(items, spec_augment, rng)

    def _layout(self, i: int) -> tuple[int, int, int, int]:
        """(reference, pause, response, total) frames: each a multiple of the frames behind
        one encoder position (so the halves never share a position), total <= max_frames."""
        m = self.step
        ref_n = min(int(self.ref_frames[i]), self.max_frames // 3) // m * m
        pause = -(-self.pause // m) * m
        resp_n = max(min(int(self.clip_frames[i]), self.max_frames - ref_n - pause) // m * m, m)
        return ref_n, pause, resp_n, ref_n + pause + resp_n

    def item(self, i: int) -> dict:
        row = self.meta.iloc[i]
        ref_n, pause, resp_n, total = self._layout(i)
        ref = self.refs.features(row["expected_text"])[:ref_n].astype(np.float32)
        resp = self.clips.get(row["filename"])[:resp_n].astype(np.float32)
        if resp.shape[0] < resp_n:  # a response shorter than 2 frames: pad with its floor
            resp = np.concatenate([resp, np.full((resp_n - resp.shape[0], resp.shape[1]),
                                                 resp.min() if resp.size else -1.0, np.float32)])
        floor = float(ref.min()) if ref.size else -1.0
        feats = np.concatenate([ref, np.full((pause, ref.shape[1]), floor, np.float32), resp])
        m = self.step
        return {"feats": feats, "floor": floor, "ref_n": ref_n, "resp_start": ref_n + pause, "resp_n": resp_n,
                "ref_pos": ref_n // m, "resp_start_pos": (ref_n + pause) // m, "resp_pos": resp_n // m,
                "task": self.task_ids[i], "grade": self.grade_ids[i],
                "target": self.targets[i], "label": None if self.labels is None else self.labels[i], **self.extras(i)}


def bucket_batches(lengths: np.ndarray, max_frames: int, max_batch: int, shuffle: bool,
                   seed: int = 0) -> list[np.ndarray]:
    """Indices grouped so that len(batch) * longest item <= max_frames (one item at least).

    Items are sorted by length (with a little noise when shuffling, so batches differ between
    epochs) and cut greedily; the batch order is then shuffled.
    """
    rng = np.random.default_rng(seed)
    keys = lengths.astype(np.float64)
    if shuffle:
        keys = keys * rng.uniform(0.9, 1.1, size=len(keys))
    order = np.argsort(keys, kind="stable")
    batches, current, longest = [], [], 0
    for i in order:
        new_longest = max(longest, int(lengths[i]))
        if current and (new_longest * (len(current) + 1) > max_frames or len(current) >= max_batch):
            batches.append(np.array(current))
            current, new_longest = [], int(lengths[i])
        current.append(int(i))
        longest = new_longest
    if current:
        batches.append(np.array(current))
    if shuffle:
        rng.shuffle(batches)
    return batches


def collate(items: list[dict], spec_augment=None, rng: np.random.Generator | None = None) -> dict:
    """Pad a list of items to the batch's longest and build the tensors the model reads."""
    n = max(it["feats"].shape[0] for it in items)
    n_mels = items[0]["feats"].shape[1]
    feats = np.empty((len(items), n, n_mels), np.float32)
    mask = np.zeros((len(items), n), bool)
    for b, it in enumerate(items):
        t = it["feats"].shape[0]
        feats[b, :t] = it["feats"]
        feats[b, t:] = it["floor"]
        mask[b, :t] = True
        if spec_augment is not None:
            spec_augment(feats[b, it["resp_start"]: t], rng)
    targets = [it["target"] for it in items]
    batch = {
        "feats": torch.from_numpy(feats),
        "frame_mask": torch.from_numpy(mask),
        "tts_positions": torch.tensor([it["ref_pos"] for it in items]),
        "resp_start": torch.tensor([it["resp_start_pos"] for it in items]),
        "resp_positions": torch.tensor([it["resp_pos"] for it in items]),
        "task": torch.tensor([int(it["task"]) for it in items]),
        "grade": torch.tensor([int(it["grade"]) for it in items]),
        "targets": torch.from_numpy(np.concatenate(targets)) if sum(map(len, targets)) else torch.zeros(0, dtype=torch.long),
        "target_lengths": torch.tensor([len(t) for t in targets]),
    }
    if items[0]["label"] is not None:
        batch["label"] = torch.tensor([float(it["label"]) for it in items])
    if "ear" in items[0]:
        batch["ear"] = torch.from_numpy(np.stack([it["ear"] for it in items]).astype(np.float32))
    if items[0].get("frozen_hidden"):  # rows are cached frozen-layer outputs per position (members/pair/frozen.py)
        batch["frozen_hidden"] = True
    return batch


class SpecAugment:
    """Time and frequency masks (filled with the clip's mean) on a response's frames, in place."""

    def __init__(self, time_masks: int, time_width: int, freq_masks: int, freq_width: int):
        self.tm, self.tw, self.fm, self.fw = time_masks, time_width, freq_masks, freq_width

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> None:
        if x.size == 0:
            return
        fill = float(x.mean())
        t_len, f_len = x.shape
        for _ in range(self.tm):
            w = int(rng.integers(0, self.tw + 1))
            if 0 < w < t_len // 4:
                s = int(rng.integers(0, t_len - w))
                x[s: s + w] = fill
        for _ in range(self.fm):
            w = int(rng.integers(0, self.fw + 1))
            if 0 < w < f_len:
                s = int(rng.integers(0, f_len - w))
                x[:, s: s + w] = fill


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
