"""Log-mel augmentation: each transform does what its waveform counterpart would, the
reference half is never touched, shapes stay aligned to encoder positions, and a run with
augmentation off is bit-identical to one without the augmenter."""
import numpy as np
import pytest

from readaloud.prep.augment import Augmenter, add_noise, mel_centres, stretch_time, warp_frequency
from readaloud.config import DataConfig, RunConfig, apply_overrides


def tone_frames(freq_bin: int, n: int = 50, n_mels: int = 80) -> np.ndarray:
    x = np.full((n, n_mels), -0.5, np.float32)
    x[:, freq_bin] = 1.0
    return x


def test_warp_moves_a_formant_up_for_a_shorter_vocal_tract():
    centres = mel_centres(80)
    x = tone_frames(40)
    up = warp_frequency(x, 1.15, centres)
    down = warp_frequency(x, 0.87, centres)
    peak = lambda y: int(np.argmax(y[0]))
    assert peak(up) > 40 > peak(down)
    assert centres[peak(up)] == pytest.approx(centres[40] * 1.15, rel=0.06)
    assert np.allclose(warp_frequency(x, 1.0, centres), x, atol=1e-6)


def test_stretch_changes_duration_and_keeps_the_content():
    x = np.linspace(0, 1, 100, dtype=np.float32)[:, None].repeat(80, 1)
    y = stretch_time(x, 1.2)
    assert y.shape == (120, 80)
    assert y[0, 0] == pytest.approx(0.0) and y[-1, 0] == pytest.approx(1.0, abs=0.02)
    assert np.all(np.diff(y[:, 0]) >= -1e-6)


def test_noise_fills_silence_but_not_the_peak():
    x = tone_frames(10)
    y = add_noise(x, 10.0, np.random.default_rng(0))
    assert y[:, 10].mean() == pytest.approx(1.0, abs=0.02)  # the peak band barely moves
    assert y[:, 60].mean() > x[:, 60].mean() + 0.5       # silence now holds noise ~10 dB down
    assert y.max() - y.min() <= 2.0 + 1e-5                # Whisper's 8-log10 floor still holds


def item_with(resp_n=120, ref_n=40, pause=20):
    rng = np.random.default_rng(0)
    feats = rng.uniform(-0.5, 1.0, (ref_n + pause + resp_n, 80)).astype(np.float32)
    return {"feats": feats, "floor": -0.5, "ref_n": ref_n, "resp_start": ref_n + pause, "resp_n": resp_n,
            "ref_pos": ref_n // 4, "resp_start_pos": (ref_n + pause) // 4, "resp_pos": resp_n // 4}


def test_augmenter_changes_only_the_response_and_keeps_positions_aligned():
    aug = Augmenter(prob=1.0, warp=0.15, stretch=0.2, noise_snr=10, gain_db=6, cutouts=2, frames_per_position=4)
    item = item_with()
    for seed in range(20):
        out = aug(item, np.random.default_rng(seed))
        start = item["resp_start"]
        assert np.array_equal(out["feats"][:start], item["feats"][:start])
        assert out["resp_n"] % 4 == 0 and out["resp_pos"] == out["resp_n"] // 4
        assert out["feats"].shape[0] == start + out["resp_n"]
        assert out["resp_n"] <= np.ceil(item["resp_n"] * aug.length_factor())
        assert np.isfinite(out["feats"]).all()
    assert not np.array_equal(aug(item, np.random.default_rng(0))["feats"], item["feats"])


def test_augmenter_is_deterministic_given_the_rng_and_off_by_default():
    aug = Augmenter(prob=0.5, warp=0.1, stretch=0.1, noise_snr=15, frames_per_position=4)
    item = item_with()
    a = aug(item, np.random.default_rng(7))["feats"]
    b = aug(item, np.random.default_rng(7))["feats"]
    assert np.array_equal(a, b)
    off = Augmenter.from_config(DataConfig(), 80, 4, 3000)
    assert not off.active and off(item, np.random.default_rng(0)) is item


def test_augmentation_is_configurable_per_variant_and_from_the_command_line():
    from readaloud.variants import scratch_variants, variant_config
    cfg = apply_overrides(RunConfig(), {"aug_prob": 0.5, "aug_warp": 0.1})
    assert cfg.data.aug_prob == 0.5 and cfg.data.aug_warp == 0.1
    # on the small encoder (--backbone scratch) model1mean and model2attn hear new voices through it
    augmented = [v for v in scratch_variants() if variant_config(v, {"backbone": "scratch"}).data.aug_prob > 0]
    assert augmented == ["model1mean", "model2attn"], augmented
