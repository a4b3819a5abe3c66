"""Features, the feature store, folds, metadata checks, batching by size, config overrides."""
import json

import numpy as np
import pandas as pd
import pytest

from readaloud.audio import AudioError, load_audio, write_wav
from readaloud.config import ConfigError, RunConfig, apply_overrides
from readaloud.data import DataError, load_split
from readaloud.prep.dataset import bucket_batches
from readaloud.features import FeatureParams, FeatureStore, log_mel
from readaloud.prep.folds import assign_folds, load_or_create_folds


def test_log_mel_matches_whisper_feature_extractor():
    from transformers import WhisperFeatureExtractor
    audio = np.random.default_rng(0).normal(0, 0.1, 16000 * 2).astype(np.float32)
    ours = log_mel(audio)
    ref = WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16000, return_tensors="np")
    ref = ref.input_features[0].T[: ours.shape[0]]
    assert ours.shape == (200, 80)
    np.testing.assert_allclose(ours[:-2], ref[:-2], atol=1e-4)  # the last frame sees Whisper's 30 s padding


def test_feature_store_roundtrip_and_interrupted_append(tmp_path):
    params = FeatureParams()
    store = FeatureStore(tmp_path, "clips", params)
    a, b = np.ones((5, 80)), np.full((3, 80), 2.0)
    assert store.add_many([("a", a), ("b", b)]) == 2
    assert store.add_many([("a", a)]) == 0, "existing keys are skipped"
    with open(store.data_path, "ab") as f:  # frames of a killed writer that never reached the index
        f.write(b"\x00" * 1000)
    again = FeatureStore(tmp_path, "clips", params)
    again.add_many([("c", np.zeros((2, 80)))])
    np.testing.assert_array_equal(again.get("b"), b.astype(np.float16))
    assert again.get("c").shape == (2, 80) and again.total_frames == 10


def test_feature_store_rebuilds_when_params_change(tmp_path):
    FeatureStore(tmp_path, "clips", FeatureParams()).add_many([("a", np.ones((4, 80)))])
    other = FeatureStore(tmp_path, "clips", FeatureParams(trim_top_db=20.0))
    assert "a" not in other


def test_folds_are_stratified_and_stable(tmp_path):
    meta = pd.DataFrame({"filename": [f"{i}.wav" for i in range(120)],
                         "task": ["a", "b", "c"] * 40, "score": [0, 1] * 60})
    folds = assign_folds(meta, 4)
    assert sorted(folds.unique()) == [0, 1, 2, 3]
    for _, g in meta.groupby(["task", "score"]):
        counts = folds[g.index].value_counts()
        assert counts.max() - counts.min() <= 1
    first = load_or_create_folds(tmp_path, meta, 4)
    assert (load_or_create_folds(tmp_path, meta.sample(frac=1, random_state=1), 4).sort_index() == first).all()
    with pytest.raises(ValueError):
        assign_folds(meta, 1)


class FakeStore(dict):
    def get(self, key):
        return self[key]


def test_voice_folds_keep_each_speaker_in_one_fold(tmp_path):
    """Three synthetic voices (a spectral envelope each, a microphone tilt) saying random
    'words' (band patterns): the voice folds must not split a speaker across folds."""
    rng = np.random.default_rng(0)
    mel = np.arange(80)
    voices = [np.sin(mel / (6 + 4 * v)) * 0.6 + (v - 1) * 0.004 * mel for v in range(3)]
    store, rows = FakeStore(), []
    for i in range(150):
        v = i % 3
        t = int(rng.integers(60, 200))
        words = np.repeat(rng.normal(0, 0.3, (t // 20 + 1, 80)), 20, axis=0)[:t]
        store[f"{i}.wav"] = (voices[v] + words + rng.normal(0, 0.1, (t, 80))).astype(np.float32)
        rows.append((f"{i}.wav", "t", int(rng.integers(0, 2)), v))
    meta = pd.DataFrame(rows, columns=["filename", "task", "score", "voice"])
    folds = load_or_create_folds(tmp_path, meta, 3, "voice", clips=store)
    table = pd.crosstab(folds, meta["voice"])
    assert (table.max(axis=0) == 50).all() and sorted(folds.unique()) == [0, 1, 2], table
    assert json.loads((tmp_path / "cache" / "folds_3.json").read_text())["fold_by"] == "voice"
    again = load_or_create_folds(tmp_path, meta, 3)  # read back from the file, whatever asked
    assert (again == folds).all()
    with pytest.raises(ValueError, match="holds voice folds, not stratified"):
        load_or_create_folds(tmp_path, meta, 3, "stratified")


def write_split(d, rows, labels=True):
    meta = pd.DataFrame(rows, columns=["filename", "task", "expected_text", "grade"])
    meta.to_csv(d / "train_metadata.csv", index=False)
    if labels:
        pd.DataFrame({"filename": meta["filename"], "score": 1}).to_csv(d / "train_labels.csv", index=False)
    for f in meta["filename"]:
        if f and not (d / f).exists():
            write_wav(d / f, np.zeros(1600, np.float32))


def test_metadata_problems_are_reported_together_with_rows(tmp_path):
    write_split(tmp_path, [("a.wav", "deletion", "boy", "KG"), ("a.wav", "blending", "", "1"),
                           ("b.wav", "blending", "cat", "2")])
    (tmp_path / "b.wav").unlink()
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "train")
    msg = str(err.value)
    assert "duplicate filenames" in msg and "row 2" in msg and "row 3" in msg
    assert "empty expected_text" in msg and "not found" in msg and "b.wav" in msg


def test_missing_column_is_named(tmp_path):
    pd.DataFrame({"filename": ["a.wav"], "task": ["x"]}).to_csv(tmp_path / "train_metadata.csv", index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) \['expected_text', 'grade'\]"):
        load_split(tmp_path, "train")


def test_audio_loader_resamples_downmixes_and_reports(tmp_path):
    import soundfile as sf
    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], 1) * 0.5
    sf.write(tmp_path / "s.wav", stereo, 44100)
    audio = load_audio(tmp_path / "s.wav")
    assert audio.dtype == np.float32 and audio.ndim == 1 and abs(audio.size - 16000) <= 1
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="empty.wav: zero-byte"):
        load_audio(tmp_path / "empty.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(AudioError, match="junk.wav: cannot decode"):
        load_audio(tmp_path / "junk.wav")


@pytest.mark.parametrize("budget", [500, 3000, 20000])
def test_bucketed_batches_respect_the_frame_budget(budget):
    lengths = np.random.default_rng(1).integers(50, 1200, size=500)
    batches = bucket_batches(lengths, budget, max_batch=64, shuffle=True, seed=3)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500)), "every item exactly once"
    for b in batches:
        assert len(b) == 1 or len(b) * lengths[b].max() <= budget
        assert len(b) <= 64


def test_overrides_reach_the_config_and_bad_ones_fail():
    cfg = apply_overrides(RunConfig(), {"lr": "2e-5", "optim.weight_decay": "0.1", "pooling": "attention"})
    assert cfg.optim.lr == 2e-5 and cfg.optim.weight_decay == 0.1 and cfg.model.pooling == "attention"
    with pytest.raises(ConfigError, match="unknown option --lrr; did you mean --lr"):
        apply_overrides(RunConfig(), {"lrr": "1"})
    with pytest.raises(ConfigError, match="--epochs: expected int, got 'three'"):
        apply_overrides(RunConfig(), {"epochs": "three"})
    with pytest.raises(ConfigError, match="not one of"):
        apply_overrides(RunConfig(), {"pooling": "max"})
