"""Perturbed copies of the training clips, so the trees see clips their Whisper ear mishears.

Whisper tiny.en and base transcribe most adult voices right, so a gradient-boosted model trained
on them learns "the transcript matches, so the answer is right" and never meets a clip the ear
gets wrong. On a speaker it mishears (FSDD's nicolas: his correct items come back as "Please",
"Nice", "You went by") that model is confidently wrong. Each copy here is the clip resampled to 0.8-1.25x
its speed (pitch, formants and tempo move together, like another vocal tract) with reddish noise
at 0-15 dB SNR; it keeps the clip's label, so the trees learn how little a garbled transcript
proves (what it measured: docs/members.md, "Ear copies for the trees").

Copies are for training only (OOF and test clips are never perturbed) and stay in their source
clip's fold. They are written once into <data>/cache/ear_<key>/ (16 kHz wav, deterministic per
clip, copy and seed), a data folder of their own, so every feature cache (clip log-mels,
alignment table, ASR evidence) works on them unchanged.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.signal import lfilter
from tqdm.auto import tqdm

from ...audio import SAMPLE_RATE, AudioError, load_audio, resample, write_wav
from ...checkpoints import atomic_write
from ...layout import cache_dir
from ...prep.clip_digests import sync_clip_caches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EarAugment:
    """How the copies are made (chosen before any measurement, not tuned on a held-out speaker)."""
    copies: int = 1
    share: float = 1.0         # of the clips that get copies, picked by a hash of the file name and seed
    speed_min: float = 0.8
    speed_max: float = 1.25
    snr_db_min: float = 0.0
    snr_db_max: float = 15.0
    noise_pole: float = 0.9    # AR(1) pole of the noise: most of its power below ~300 Hz at 16 kHz
    seed: int = 0

    def __post_init__(self):
        if self.copies < 0:
            raise ValueError(f"copies must be 0 or more, got {self.copies}")
        if not 0 < self.share <= 1:
            raise ValueError(f"share must be in (0, 1], got {self.share}")
        if not 0 < self.speed_min <= self.speed_max:
            raise ValueError(f"speed range must be positive and ordered, got {self.speed_min}-{self.speed_max}")
        if self.snr_db_min > self.snr_db_max:
            raise ValueError(f"SNR range must be ordered, got {self.snr_db_min}-{self.snr_db_max}")

    def key(self) -> str:
        """Names the copies' folder: every setting but the number of copies and the share of clips
        (copy c of a clip is the same whatever the count and share)."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("copies", "share")}
        return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def copy_rng(filename: str, copy: int, seed: int) -> np.random.Generator:
    """The same draws for a clip and copy in every process and on every rerun."""
    digest = int.from_bytes(hashlib.sha1(filename.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, copy, digest])


def perturb(audio: np.ndarray, rng: np.random.Generator, aug: EarAugment) -> np.ndarray:
    """A 16 kHz clip resampled to a random speed, plus reddish noise at a random SNR; float32 in [-1, 1]."""
    speed = rng.uniform(aug.speed_min, aug.speed_max)
    # played back at 16 kHz after resampling to 16 kHz / speed (rounded to 100 Hz: a small
    # rational ratio keeps the polyphase filter short)
    y = resample(audio, SAMPLE_RATE, int(round(SAMPLE_RATE / speed / 100.0)) * 100).astype(np.float64)
    noise = lfilter([1.0], [1.0, -aug.noise_pole], rng.standard_normal(y.size))
    snr_db = rng.uniform(aug.snr_db_min, aug.snr_db_max)
    signal_power, noise_power = np.mean(y ** 2) + 1e-12, np.mean(noise ** 2) + 1e-12
    y = y + noise * np.sqrt(signal_power / noise_power / 10 ** (snr_db / 10))
    peak = np.abs(y).max()
    return (y / peak * 0.9 if peak > 0.99 else y).astype(np.float32)


def gets_copies(filename: str, aug: EarAugment) -> bool:
    """Whether a clip is among the `aug.share` of clips that get copies: a uniform draw from its
    name and the seed, so the same clips in every fold, process and rerun, and a larger share keeps
    every clip a smaller one picked."""
    digest = hashlib.sha1(f"{aug.seed}:{filename}".encode()).digest()
    return aug.share >= 1 or int.from_bytes(digest[:8], "little") / 2 ** 64 < aug.share


def copy_name(filename: str, copy: int) -> str:
    return f"{Path(filename).stem}.ear{copy}.wav"


def copies_dir(data_dir: str | Path, aug: EarAugment) -> Path:
    return cache_dir(data_dir) / f"ear_{aug.key()}"


def ensure_copies(data_dir: str | Path, meta: pd.DataFrame, aug: EarAugment, progress: bool = True
                  ) -> tuple[Path, pd.DataFrame]:
    """The copies' folder and one metadata row per copy of each row of `meta` that gets copies
    (`gets_copies`; its columns, with `filename` the copy's and `source` the clip's); writes the
    copies it lacks. A clip that cannot
    be read gets no copies (it is already reported as a bad clip)."""
    folder = copies_dir(data_dir, aug)
    folder.mkdir(parents=True, exist_ok=True)
    rows, todo = [], []
    for row in meta.to_dict("records"):
        if not gets_copies(str(row["filename"]), aug):
            continue
        for c in range(aug.copies):
            name = copy_name(row["filename"], c)
            rows.append({**row, "filename": name, "source": row["filename"]})
            if not (folder / name).exists():
                todo.append((row["filename"], c, name))
    unreadable: set[str] = set()
    for source, c, name in tqdm(todo, desc="ear copies", unit="clip", disable=not progress or not todo):
        if source in unreadable:
            continue
        try:
            audio = load_audio(Path(data_dir) / source)
        except AudioError as exc:
            log.warning("no ear copies of %s: %s", source, exc)
            unreadable.add(source)
            continue
        tmp = folder / f".{Path(name).stem}.tmp{os.getpid()}.wav"
        write_wav(tmp, perturb(audio, copy_rng(source, c, aug.seed), aug))
        tmp.replace(folder / name)
    settings = folder / "ear_augment.json"
    if todo or not settings.exists():  # what made the folder; every fold of a run would rewrite it otherwise
        atomic_write(settings, json.dumps(asdict(aug) | {"key": aug.key()}, indent=1))
    out = pd.DataFrame(rows, columns=[*meta.columns, "source"])
    written = np.array([(folder / n).exists() for n in out["filename"]], bool)   # also when there are no rows
    out = out[written].reset_index(drop=True)
    # the copies' folder records each copy's digest as the copy is handed out, before any cache of the folder
    # holds it: a later step's sync (clip features, another caller's copies) would otherwise take a copy it has
    # never seen for a new clip and forget what an earlier reader cached for it (the fold ears' encoder outputs)
    sync_clip_caches(folder, out["filename"].tolist())
    return folder, out
