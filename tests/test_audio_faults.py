"""Every kind of wav a screener collects becomes mono float32 at 16 kHz, or a clear error naming
the file; in feature extraction a bad clip is reported, never silently lost."""
import numpy as np
import pytest
import soundfile as sf

from readaloud.audio import AudioError, load_audio
from readaloud.features import FeatureParams, iter_clip_features


def tone(sr, seconds=1.0, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    x = 0.5 * np.sin(2 * np.pi * 440 * t)
    return np.stack([x] * channels, 1) if channels > 1 else x


@pytest.mark.parametrize("sr", [8000, 16000, 22050, 44100, 48000])
def test_sample_rates_become_16k(tmp_path, sr):
    sf.write(tmp_path / "a.wav", tone(sr), sr, subtype="PCM_16")
    audio = load_audio(tmp_path / "a.wav")
    assert audio.dtype == np.float32 and audio.ndim == 1 and abs(audio.size - 16000) <= 2
    assert 0.3 < np.abs(audio).max() <= 1.0


def test_stereo_is_downmixed(tmp_path):
    sf.write(tmp_path / "s.wav", tone(48000, channels=2), 48000)
    assert load_audio(tmp_path / "s.wav").ndim == 1


def test_nan_samples_are_zeroed_not_fatal(tmp_path):
    x = tone(16000).astype(np.float32)
    x[100:200] = np.nan
    sf.write(tmp_path / "n.wav", x, 16000, subtype="FLOAT")
    audio = load_audio(tmp_path / "n.wav")
    assert np.isfinite(audio).all() and audio[150] == 0


def test_all_nan_is_an_error(tmp_path):
    sf.write(tmp_path / "nan.wav", np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav: every sample is NaN"):
        load_audio(tmp_path / "nan.wav")


def test_broken_files_are_named(tmp_path):
    sf.write(tmp_path / "ok.wav", tone(16000), 16000, subtype="PCM_16")
    data = (tmp_path / "ok.wav").read_bytes()
    (tmp_path / "zero.wav").write_bytes(b"")
    (tmp_path / "header.wav").write_bytes(data[:44])
    (tmp_path / "garbage.wav").write_bytes(b"\x00\x01" * 500)
    for name, pattern in (("zero.wav", "zero-byte"), ("header.wav", "no audio samples|cannot decode"),
                          ("garbage.wav", "cannot decode"), ("absent.wav", "file not found")):
        with pytest.raises(AudioError, match=f"{name}: ({pattern})"):
            load_audio(tmp_path / name)


def test_truncated_file_keeps_what_is_there(tmp_path):
    sf.write(tmp_path / "ok.wav", tone(16000), 16000, subtype="PCM_16")
    data = (tmp_path / "ok.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    audio = load_audio(tmp_path / "cut.wav")
    assert 0 < audio.size < 16000


def test_featurizing_reports_bad_and_tiny_clips(tmp_path):
    sf.write(tmp_path / "ok.wav", tone(16000), 16000, subtype="PCM_16")
    sf.write(tmp_path / "tiny.wav", np.zeros(40), 16000, subtype="PCM_16")  # shorter than one frame
    (tmp_path / "zero.wav").write_bytes(b"")
    out = {p.name: (frames, err) for p, frames, err in
           iter_clip_features([tmp_path / n for n in ("ok.wav", "tiny.wav", "zero.wav")], FeatureParams())}
    assert out["ok.wav"][0].shape[1] == 80 and out["ok.wav"][1] is None
    assert out["tiny.wav"][0] is None and "shorter than one frame" in out["tiny.wav"][1]
    assert out["zero.wav"][0] is None and "zero.wav: zero-byte" in out["zero.wav"][1]
