"""The frozen Whisper encoder's output, cached once per clip: what model8decoder's decoder and
model6asr's fold ears (members/gbm/fold_ears.py) read instead of running the encoder again.

A clip is encoded on a zero-padded window of `window_s` (10 s; the next multiple that holds a longer
clip, at most Whisper's 30 s: features.whisper_window_s), and its output cut to the clip +
`margin_s` (all positions when < 0) and stored in float16 in a FeatureStore beside the clip
features, named by the engine, the encoder's weights and every input setting (another window or
margin is another cache, never a reset of this one).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from transformers import WhisperConfig

from ..audio import SAMPLE_RATE, AudioError, load_audio
from ..features import FeatureParams, FeatureStore, whisper_window_s, window_log_mel
from ..layout import cache_dir
from .encoding import WindowEncoder

log = logging.getLogger("readaloud.train")
ENCODER_CACHE_VERSION = 2
WINDOW_S = 10.0              # shortest input window; longer clips get the next multiple, up to 30 s
POSITION_S = 0.02            # one encoder position


@dataclass(frozen=True)
class EncoderCacheParams:
    """What a cached row means (FeatureStore keys its files on `key()`)."""
    width: int                 # d_model
    weights_key: str
    n_input_mels: int
    window_s: float
    margin_s: float            # < 0: all positions of the window
    version: int = ENCODER_CACHE_VERSION

    @property
    def n_mels(self) -> int:
        """The row width, under the name FeatureStore reads."""
        return self.width

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def kept_positions(n_samples: int, margin_s: float, n_positions: int) -> int:
    """Encoder positions kept of a clip of n_samples: the clip + margin (all when margin < 0)."""
    if margin_s < 0:
        return n_positions
    return max(1, min(n_positions, math.ceil((n_samples / SAMPLE_RATE + margin_s) / POSITION_S)))


def clip_window(audio: np.ndarray, mel_params: FeatureParams, window_s: float = WINDOW_S) -> np.ndarray:
    """[n_mels, frames] log-mel of the audio zero-padded to its window: the smallest multiple of
    `window_s` that holds it (features.whisper_window_s)."""
    return window_log_mel(audio, whisper_window_s(audio.size, window_s), mel_params)


def encode_clips(encoder: WindowEncoder, mels: list[np.ndarray], sizes: list[int], margin_s: float):
    """(index, [positions, D] float16) per clip: one encoder call per window size, each output cut
    to its clip + margin_s. What EncoderCache stores, and the decoder's silent clip."""
    for width in sorted({m.shape[1] for m in mels}):
        rows = [b for b, m in enumerate(mels) if m.shape[1] == width]
        hidden = encoder(np.stack([mels[b] for b in rows]))
        for k, b in enumerate(rows):
            yield b, hidden[k, :kept_positions(sizes[b], margin_s, hidden.shape[1])].astype(np.float16)


class EncoderCache:
    """The frozen encoder's output per clip, [positions, D] float16, in <data>/cache."""

    def __init__(self, encoder: WindowEncoder, config: WhisperConfig, data_dir: str | Path, margin_s: float,
                 window_s: float = WINDOW_S):
        self.encoder, self.data_dir, self.margin_s, self.window_s = encoder, Path(data_dir), margin_s, window_s
        self.n_positions = config.max_source_positions
        self.mel_params = FeatureParams(n_mels=config.num_mel_bins)
        params = EncoderCacheParams(width=config.d_model, weights_key=encoder.key,
                                    n_input_mels=config.num_mel_bins, window_s=float(window_s),
                                    margin_s=float(margin_s))
        # named by every setting, not the weights alone: runs with other windows or margins that share
        # a data folder keep a cache each instead of resetting one another's
        self.store = FeatureStore(cache_dir(data_dir), f"whisperenc_{params.weights_key}_{params.key()}", params)

    def __contains__(self, filename: str) -> bool:
        return filename in self.store

    def get(self, filename: str) -> np.ndarray:
        return self.store.get(filename)

    def length(self, filename: str) -> int:
        return self.store.length(filename)

    def window(self, audio: np.ndarray) -> np.ndarray:
        return clip_window(audio, self.mel_params, self.window_s)

    def ensure(self, filenames, progress: bool = True) -> int:
        """Encode every clip not cached yet; returns how many were computed. Unreadable clips are
        left out with a warning naming them (the datasets then skip their rows). The index is read again
        first: a clip another step made this folder forget (clip_digests) is computed, not taken as cached."""
        self.store.refresh()
        todo = [f for f in dict.fromkeys(filenames) if f not in self.store]
        if not todo:
            return 0
        return self.store.add_many(self._outputs(todo, progress))

    def _outputs(self, names: list[str], progress: bool):
        batch_size = self.encoder.batch_size
        bar = tqdm(total=len(names), desc="Whisper encoder", unit="clip", disable=not progress, leave=False)
        try:
            for start in range(0, len(names), batch_size):
                keys, mels, sizes = [], [], []
                for name in names[start: start + batch_size]:
                    if name in self.store:  # another process added it while this one waited for the store's lock
                        continue
                    try:
                        audio = load_audio(self.data_dir / name)
                    except AudioError as exc:
                        log.warning("no Whisper encoding for %s: %s", name, exc)
                        continue
                    keys.append(name)
                    mels.append(self.window(audio))
                    sizes.append(audio.size)
                for b, encoded in encode_clips(self.encoder, mels, sizes, self.margin_s):
                    yield keys[b], encoded
                bar.update(len(names[start: start + batch_size]))
        finally:
            bar.close()
