"""Whisper log-mel features and a compact on-disk cache of them.

Clips are decoded and turned into features once; training and inference then read float16
frames from one memory-mapped file per store (no per-item decoding, resampling or padding
to 30 s). A store is append-only with an index written atomically, so an interrupted build
loses at most the clips after its last flush and a rerun picks up where it stopped.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import torch

from .audio import SAMPLE_RATE, AudioError, load_audio, trim_silence
from .checkpoints import atomic_write

FEATURE_VERSION = 1


@dataclass(frozen=True)
class FeatureParams:
    """What a cached frame means; a store built with other params is rebuilt, not reused."""
    n_mels: int = 80
    n_fft: int = 400
    hop_length: int = 160
    sample_rate: int = SAMPLE_RATE
    trim_top_db: float = 35.0      # leading/trailing silence trimming (<= 0 disables)
    trim_margin_s: float = 0.1
    max_seconds: float = 20.0      # longer clips keep their start (Whisper sees 30 s at most)

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": FEATURE_VERSION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


_MEL_FILTERS: dict[tuple, torch.Tensor] = {}


def mel_filters(params: FeatureParams) -> torch.Tensor:
    """Slaney mel filters exactly as Whisper's feature extractor builds them."""
    k = (params.n_mels, params.n_fft, params.sample_rate)
    if k not in _MEL_FILTERS:
        from transformers.audio_utils import mel_filter_bank
        fb = mel_filter_bank(num_frequency_bins=1 + params.n_fft // 2, num_mel_filters=params.n_mels,
                             min_frequency=0.0, max_frequency=params.sample_rate / 2,
                             sampling_rate=params.sample_rate, norm="slaney", mel_scale="slaney")
        _MEL_FILTERS[k] = torch.from_numpy(fb.T.astype(np.float32)).contiguous()
    return _MEL_FILTERS[k]


def log_mel(audio: np.ndarray, params: FeatureParams = FeatureParams()) -> np.ndarray:
    """Whisper's log-mel of `audio` (16 kHz float32) as [frames, n_mels] float32.

    Identical to WhisperFeatureExtractor on the same samples, except that nothing is padded
    to 30 s: one frame per hop, the last STFT frame dropped as Whisper does.
    """
    if audio.size < params.n_fft:
        audio = np.pad(audio, (0, params.n_fft - audio.size))
    wave = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    window = torch.hann_window(params.n_fft)
    stft = torch.stft(wave, params.n_fft, params.hop_length, window=window, return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()
    mel = mel_filters(params) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).T.contiguous().numpy()


WHISPER_WINDOW_S = 30.0   # the window Whisper was trained on; its encoder has positions for no more


def whisper_window_s(n_samples: int, shortest_s: float) -> float:
    """The padded window a clip of n_samples is read in: the smallest multiple of `shortest_s`
    that holds it, at most Whisper's 30 s (longer clips are cut there).

    Whisper was trained on 30 s windows only, and real-length input wrecks its transcripts, but a
    10 s padded window does not, at a fraction of 30 s's cost (docs/benchmarks.md, "Children reading
    aloud", the 10 s window). Growing by whole windows keeps every clip's speech inside the window and few
    window sizes in a cache."""
    if shortest_s <= 0 or shortest_s >= WHISPER_WINDOW_S:
        return WHISPER_WINDOW_S
    seconds = n_samples / SAMPLE_RATE
    return float(min(WHISPER_WINDOW_S, max(1, math.ceil(seconds / shortest_s - 1e-9)) * shortest_s))


def window_log_mel(audio: np.ndarray, window_s: float, params: FeatureParams = FeatureParams()) -> np.ndarray:
    """[n_mels, frames] log-mel of `audio` cut or zero-padded to a `window_s` window, as Whisper
    reads it (whisper_window_s picks the window)."""
    n = int(round(window_s * SAMPLE_RATE))
    audio = np.pad(audio[:n], (0, max(0, n - audio.size))).astype(np.float32)
    return np.ascontiguousarray(log_mel(audio, params).T)


def clip_features(audio: np.ndarray, params: FeatureParams = FeatureParams()) -> np.ndarray:
    """Trim, cap and featurize one decoded clip (the single place that defines a clip's frames)."""
    if params.trim_top_db > 0:
        audio = trim_silence(audio, params.sample_rate, params.trim_top_db, params.trim_margin_s)
    audio = audio[: int(params.max_seconds * params.sample_rate)]
    return log_mel(audio, params).astype(np.float16)


@contextlib.contextmanager
def file_lock(path: Path):
    """Exclusive inter-process lock (parallel trainers must not append to a store at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # no fcntl (Windows): run preprocess.py before parallel training
            pass
        yield


def read_npz_cache(path: Path, parse, what: str):
    """`parse(npz)` of a cache file, or None when there is none or it is damaged (a damaged cache
    costs a recomputation, never a run)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return parse(z)
    except Exception as exc:
        logging.getLogger("readaloud").warning("%s %s is unreadable (%s): recomputing it", what, path, exc)
        return None


def merge_npz_cache(path: Path, read, merge, arrays) -> None:
    """Read the cache under its lock, `merge` the new rows into what `read` gave, and replace the
    file atomically with `arrays(merged)`, so parallel processes never lose each other's rows."""
    with file_lock(path.with_name(f".{path.name}.lock")):
        table = read(path)
        merge(table)
        buf = io.BytesIO()
        np.savez(buf, **arrays(table))
        atomic_write(path, buf.getvalue())


class BatchedCacheWrites:
    """Entries computed clip by clip, handed to `add(cache, entries)` every `flush_every` of them and
    once more at the end (`close`), so an interrupted run keeps what it did. No cache: nothing is written."""

    def __init__(self, add, cache: Path | None, flush_every: int):
        self.add, self.cache, self.flush_every = add, cache, flush_every
        self.fresh: dict = {}

    def update(self, entries: dict) -> None:
        self.fresh.update(entries)
        if self.cache is not None and len(self.fresh) >= self.flush_every:
            self.close()

    def close(self) -> None:
        if self.cache is not None and self.fresh:
            self.add(self.cache, self.fresh)
        self.fresh = {}


class FeatureStore:
    """Append-only store of [frames, n_mels] float16 arrays keyed by a string.

    Files: `<root>/<name>.f16` (all frames back to back), `<name>.index.csv` (key, offset,
    length), `<name>.json` (params). Reads are zero-copy views into a memmap.
    """

    def __init__(self, root: str | Path, name: str, params: FeatureParams):
        self.root, self.name, self.params = Path(root), name, params
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_path = self.root / f"{name}.f16"
        self.index_path = self.root / f"{name}.index.csv"
        self.meta_path = self.root / f"{name}.json"
        self._index: dict[str, tuple[int, int]] = {}
        self._mmap: np.memmap | None = None
        self._load()

    def _load(self, writer: bool = False) -> None:
        """Read the index. Only a writer (holding the lock) repairs or resets files."""
        meta = {"params": asdict(self.params), "feature_key": self.params.key()}

        def is_stale() -> bool:
            return self.meta_path.exists() and \
                json.loads(self.meta_path.read_text()).get("feature_key") != meta["feature_key"]
        if is_stale() or not self.meta_path.exists():
            with file_lock(self.root / f".{self.name}.lock"):
                # decided again under the lock: another process may have reset it and added frames since
                stale = is_stale()
                if stale:  # built with other feature settings: start over rather than mix frames
                    for p in (self.data_path, self.index_path):
                        p.unlink(missing_ok=True)
                if stale or not self.meta_path.exists():
                    atomic_write(self.meta_path, json.dumps(meta, indent=1))
        self._index = {}
        if self.index_path.exists():
            df = pd.read_csv(self.index_path, dtype={"key": str}, keep_default_na=False)
            self._index = {k: (int(o), int(n)) for k, o, n in zip(df["key"], df["offset"], df["length"])}
        end = self.total_frames
        row_bytes = self.params.n_mels * 2
        if writer and self.data_path.exists() and self.data_path.stat().st_size != end * row_bytes:
            # frames written after the last index flush (an interrupted build): drop them
            with open(self.data_path, "r+b") as f:
                f.truncate(end * row_bytes)
        self._mmap = None

    def refresh(self) -> None:
        """Read the index again: another process (or a cache sync, clip_digests) may have added or
        dropped keys since this store was opened."""
        self._load()

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[str]:
        return list(self._index)

    @property
    def total_frames(self) -> int:
        return max((o + n for o, n in self._index.values()), default=0)

    def length(self, key: str) -> int:
        return self._index[key][1]

    def get(self, key: str) -> np.ndarray:
        offset, length = self._index[key]
        if self._mmap is None:
            self._mmap = np.memmap(self.data_path, dtype=np.float16, mode="r",
                                   shape=(self.total_frames, self.params.n_mels))
        return self._mmap[offset: offset + length]

    def add_many(self, items: Iterable[tuple[str, np.ndarray]], flush_every: int = 256) -> int:
        """Append (key, frames) pairs; existing keys are skipped. Returns how many were added."""
        with file_lock(self.root / f".{self.name}.lock"):
            self._load(writer=True)  # another process may have added frames since we opened it
            return self._add_locked(items, flush_every)

    def _add_locked(self, items, flush_every: int) -> int:
        added = 0
        end = self.total_frames
        pending: list[tuple[str, int, int]] = []
        with open(self.data_path, "ab") as f:
            for key, frames in items:
                if key in self._index or any(k == key for k, _, _ in pending):
                    continue
                frames = np.ascontiguousarray(frames, dtype=np.float16)
                if frames.ndim != 2 or frames.shape[1] != self.params.n_mels:
                    raise ValueError(f"{key}: frames of shape {frames.shape}, expected [T, {self.params.n_mels}]")
                f.write(frames.tobytes())
                pending.append((key, end, frames.shape[0]))
                end += frames.shape[0]
                added += 1
                if len(pending) >= flush_every:
                    f.flush()
                    self._commit(pending)
                    pending = []
            f.flush()
            self._commit(pending)
        self._mmap = None
        return added

    def _commit(self, pending: list[tuple[str, int, int]]) -> None:
        if not pending:
            return
        for key, offset, length in pending:
            self._index[key] = (offset, length)
        df = pd.DataFrame([(k, o, n) for k, (o, n) in self._index.items()], columns=["key", "offset", "length"])
        atomic_write(self.index_path, df.to_csv(index=False))


def iter_clip_features(paths: list[Path], params: FeatureParams, workers: int = 1
                       ) -> Iterator[tuple[Path, np.ndarray | None, str | None]]:
    """Decode + featurize clips (in a process pool when workers > 1), yielding in input order.

    Yields (path, frames, None) or (path, None, error message) for a clip that cannot be used.
    """
    if workers <= 1:
        for p in paths:
            yield _featurize_one((p, params))
        return
    import multiprocessing as mp
    ctx = mp.get_context("spawn" if torch.cuda.is_available() else "fork")
    with ctx.Pool(workers, initializer=_worker_init) as pool:
        yield from pool.imap(_featurize_one, [(p, params) for p in paths], chunksize=16)


def _worker_init() -> None:
    torch.set_num_threads(1)


def _featurize_one(args: tuple[Path, FeatureParams]) -> tuple[Path, np.ndarray | None, str | None]:
    path, params = args
    try:
        audio = load_audio(path, params.sample_rate)
        if audio.size < params.hop_length:
            raise AudioError(f"{path}: shorter than one frame ({audio.size} samples)")
        return path, clip_features(audio, params), None
    except AudioError as exc:
        return path, None, str(exc)
    except Exception as exc:  # anything else a broken file provokes: report it, lose nothing
        return path, None, f"{path}: {type(exc).__name__}: {exc}"
