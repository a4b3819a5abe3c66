"""Audio decoding: any wav we are handed becomes mono float32 at 16 kHz, or a clear error.

Every clip is decoded once (by preprocess.py / inference) and only its features are kept,
so this module favours robustness over speed.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16_000


class AudioError(ValueError):
    """A clip that cannot be turned into usable audio; the message names the file."""


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling (exact rational ratio, anti-aliased)."""
    from scipy.signal import resample_poly  # here, not at import: training processes never resample (its import is slow)
    if orig_sr == target_sr:
        return audio.astype(np.float32, copy=False)
    g = math.gcd(int(orig_sr), int(target_sr))
    return resample_poly(audio, target_sr // g, orig_sr // g).astype(np.float32)


def load_audio(path: str | Path, target_sr: int = SAMPLE_RATE, min_seconds: float = 0.0) -> np.ndarray:
    """Decode `path` to mono float32 in [-1, 1] at `target_sr`.

    Stereo is averaged, any sample rate is resampled, non-finite samples are zeroed (a few
    NaNs in a long clip should not cost the clip). Raises AudioError naming the file for a
    missing, empty, undecodable or all-NaN file, or one shorter than `min_seconds`.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: zero-byte file")
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for broken headers / data
        raise AudioError(f"{path}: cannot decode audio ({exc})") from exc
    if audio.size == 0:
        raise AudioError(f"{path}: no audio samples (header only?)")
    audio = audio.mean(axis=1)
    finite = np.isfinite(audio)
    if not finite.any():
        raise AudioError(f"{path}: every sample is NaN or infinite")
    if not finite.all():
        audio = np.where(finite, audio, 0.0).astype(np.float32)
    audio = resample(audio, sr, target_sr)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak > 1.0:  # float wavs may exceed full scale; keep the log-mel in a sane range
        audio = audio / peak
    if audio.size < min_seconds * target_sr:
        raise AudioError(f"{path}: only {audio.size / target_sr:.3f} s of audio (< {min_seconds} s)")
    return np.ascontiguousarray(audio, dtype=np.float32)


def write_wav(path: str | Path, audio: np.ndarray, sr: int = SAMPLE_RATE) -> None:
    """16-bit PCM wav (what recorders and the competition hand us)."""
    sf.write(str(path), np.clip(audio, -1.0, 1.0), sr, subtype="PCM_16")


def trim_silence(audio: np.ndarray, sr: int = SAMPLE_RATE, top_db: float = 35.0,
                 margin_s: float = 0.1, min_seconds: float = 0.3) -> np.ndarray:
    """Cut leading/trailing stretches quieter than `top_db` below the clip's loudest frame.

    Shorter inputs mean a cheaper encoder; a margin keeps soft onsets, and a clip that is
    all silence keeps `min_seconds` from its middle, so "said nothing" stays visible.
    """
    frame = int(0.025 * sr)
    hop = int(0.010 * sr)
    if audio.size < frame:
        return audio
    n = 1 + (audio.size - frame) // hop
    idx = np.arange(frame)[None, :] + hop * np.arange(n)[:, None]
    energy = np.sqrt(np.mean(audio[idx] ** 2, axis=1) + 1e-12)
    db = 20 * np.log10(energy)
    # the threshold follows the noise floor too: in a noisy room nothing is 35 dB down
    floor = float(np.percentile(db, 10))
    threshold = max(db.max() - top_db, min(floor + 8.0, db.max() - 15.0))
    loud = np.flatnonzero(db > threshold)
    margin = int(margin_s * sr)
    start = max(0, loud[0] * hop - margin)
    end = min(audio.size, loud[-1] * hop + frame + margin)
    min_len = int(min_seconds * sr)
    if end - start < min_len:
        mid = (start + end) // 2
        start = max(0, min(mid - min_len // 2, audio.size - min_len))
        end = min(audio.size, start + min_len)
    return audio[start:end]
