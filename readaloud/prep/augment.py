"""Waveform-style augmentation of a response, done on its cached Whisper log-mel.

The seed solution pitch-shifted, time-stretched, added noise, changed gain and cut pieces out
of the waveform, then recomputed features on every access. Each of those has a cheap exact or
close equivalent on the log-mel itself, so the feature cache stays the only audio read:

- warp (vocal tract length / pitch): a speaker with a shorter vocal tract has every formant
  higher by a factor; the spectrum S'(f) = S(f / a) is resampled on the mel bins' centre
  frequencies (the VTLP augmentation of Jaitly & Hinton, 2013);
- stretch (tempo): the frame axis is resampled by a factor (speed without pitch change);
- noise: noise power is added in the power domain at a random SNR below the clip's peak,
  with a random spectral tilt and exponential (Rayleigh-amplitude) fluctuations;
- gain: the response's level moves relative to the reference's (the two are normalised
  separately, so this is what a louder or quieter child looks like beside the TTS);
- cut-outs: short stretches set to silence (a dropped frame burst, a glottal stop), kept
  short (20-80 ms) so a correct answer never loses a whole word and turns incorrect.

Whisper normalisation is x = (max(log10 P, peak - 8) + 4) / 4, so log10 P = 4x - 4.
Everything here works in place on float32 arrays and draws from the caller's RNG, so a
resumed run augments identically.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000
FLOOR_RANGE = 2.0  # Whisper keeps 8 log10 units below the peak: 8 / 4 in normalised units


def mel_centres(n_mels: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Centre frequency (Hz) of each mel band of Whisper's (Slaney) filter bank."""
    import librosa
    return librosa.mel_frequencies(n_mels + 2, fmin=0.0, fmax=sample_rate / 2, htk=False)[1:-1]


def warp_frequency(x: np.ndarray, factor: float, centres: np.ndarray) -> np.ndarray:
    """S'(f) = S(f / factor) on the mel bins ([T, n_mels] -> same shape)."""
    pos = np.interp(centres / factor, centres, np.arange(len(centres), dtype=np.float64))
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(centres) - 1)
    w = (pos - lo).astype(np.float32)
    return x[:, lo] * (1 - w) + x[:, hi] * w


def stretch_time(x: np.ndarray, factor: float) -> np.ndarray:
    """Resample the frame axis: factor > 1 is slower (more frames)."""
    t = x.shape[0]
    n = max(1, int(round(t * factor)))
    src = np.minimum(np.arange(n) / factor, t - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, t - 1)
    w = (src - lo).astype(np.float32)[:, None]
    return x[lo] * (1 - w) + x[hi] * w


def add_noise(x: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Add noise `snr_db` below the clip's peak power, then re-apply Whisper's floor."""
    if x.size == 0:
        return x
    log_p = 4.0 * x - 4.0
    peak = float(log_p.max())
    tilt = rng.uniform(-1.0, 1.0) * np.linspace(-0.5, 0.5, x.shape[1])  # +-0.5 log10 across the band
    noise_log = peak - snr_db / 10.0 + tilt
    fluct = rng.exponential(1.0, size=x.shape)
    power = 10.0 ** log_p + fluct * 10.0 ** noise_log[None, :]
    y = np.log10(power)
    y = np.maximum(y, y.max() - 8.0)
    return ((y + 4.0) / 4.0).astype(np.float32)


@dataclass
class Augmenter:
    """Draws and applies the configured augmentations to one pair item (its response half)."""
    prob: float = 0.0
    warp: float = 0.0
    stretch: float = 0.0
    noise_snr: float = 0.0
    gain_db: float = 0.0
    cutouts: int = 0
    n_mels: int = 80
    frames_per_position: int = 2
    max_frames: int = 3000

    def __post_init__(self):
        self._centres = mel_centres(self.n_mels) if self.warp > 0 else None

    @classmethod
    def from_config(cls, data_cfg, n_mels: int, frames_per_position: int, max_frames: int) -> "Augmenter":
        return cls(data_cfg.aug_prob, data_cfg.aug_warp, data_cfg.aug_stretch, data_cfg.aug_noise_snr,
                   data_cfg.aug_gain_db, data_cfg.aug_cutouts, n_mels, frames_per_position, max_frames)

    @property
    def active(self) -> bool:
        return self.prob > 0 and bool(self.warp or self.stretch or self.noise_snr or self.gain_db or self.cutouts)

    def length_factor(self) -> float:
        """Worst-case growth of an item, for batch budgets."""
        return 1.0 + self.stretch if self.active else 1.0

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        """A new item with an augmented response (the reference half is left alone)."""
        if not self.active:
            return item
        start = item["resp_start"]
        resp = item["feats"][start: start + item["resp_n"]]
        floor = float(resp.min()) if resp.size else item["floor"]
        on = rng.random(5) < self.prob  # draw all five, so the stream does not depend on settings
        factors = rng.uniform(-1.0, 1.0, size=3)
        if self.warp and on[0]:
            resp = warp_frequency(resp, 1.0 + self.warp * factors[0], self._centres)
        if self.stretch and on[1]:
            resp = stretch_time(resp, 1.0 + self.stretch * factors[1])
        if self.noise_snr and on[2]:
            resp = add_noise(resp, self.noise_snr + 20.0 * rng.random(), rng)
            floor = float(resp.min())
        if self.gain_db and on[3]:
            shift = self.gain_db * factors[2] / 40.0  # 1 dB = 0.1 log10 = 0.025 normalised
            resp = np.maximum(resp + shift, floor)
        if self.cutouts and on[4]:
            resp = resp.copy()
            for _ in range(int(rng.integers(1, self.cutouts + 1))):
                width = int(rng.integers(2, 9))
                if resp.shape[0] > 4 * width:
                    s = int(rng.integers(0, resp.shape[0] - width))
                    resp[s: s + width] = floor
        m = self.frames_per_position
        n = min(resp.shape[0], self.max_frames - start) // m * m
        if n < m:  # too short to hold one position: pad with silence
            resp = np.concatenate([resp, np.full((m - resp.shape[0], resp.shape[1]), floor, np.float32)])
            n = m
        feats = np.concatenate([item["feats"][:start], resp[:n].astype(np.float32)])
        return {**item, "feats": feats, "resp_n": n, "resp_pos": n // m}
