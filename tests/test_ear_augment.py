"""Ear copies (members/gbm/ear_augment.py): perturbed training clips for the gbm member.

A copy is deterministic (same bytes on a rerun, in any process), is made once (a rerun writes
nothing), keeps its source clip's row (label, fold, text) and is really perturbed; a clip that
cannot be read gets no copies and loses nothing else."""
import hashlib
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from readaloud.audio import SAMPLE_RATE, load_audio, write_wav
from readaloud.features import FeatureParams, FeatureStore
from readaloud.layout import cache_dir
from readaloud.prep.clip_digests import forget_clips
from readaloud.prep.prepare import ensure_clip_features
from readaloud.whisper.encoder_cache import EncoderCache
from readaloud.members.gbm.ear_augment import EarAugment, copies_dir, copy_name, copy_rng, ensure_copies, gets_copies, perturb


def _tone(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture
def data(tmp_path):
    rows = []
    for i, (seconds, freq) in enumerate([(1.0, 220.0), (1.5, 330.0), (0.7, 440.0)]):
        name = f"clip{i}.wav"
        write_wav(tmp_path / name, _tone(seconds, freq))
        rows.append({"filename": name, "task": "blending", "expected_text": f"word {i}", "grade": "1",
                     "score": i % 2, "fold": i})
    return tmp_path, pd.DataFrame(rows)


def _digest(path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_perturb_changes_speed_and_adds_noise():
    clip = _tone(2.0, 300.0)
    aug = EarAugment()
    outs = [perturb(clip, copy_rng("a.wav", c, 0), aug) for c in range(8)]
    for y in outs:
        assert y.dtype == np.float32 and np.abs(y).max() <= 1.0
        ratio = clip.size / y.size
        assert aug.speed_min - 0.01 <= ratio <= aug.speed_max + 0.01, ratio
    assert len({y.size for y in outs}) > 1, "speeds differ between copies"
    same_len = [y for y in outs if y.size == clip.size]
    for y in same_len:
        assert not np.allclose(y, clip, atol=1e-3), "noise was added"
    again = perturb(clip, copy_rng("a.wav", 3, 0), aug)
    assert np.array_equal(again, outs[3]), "same clip, copy and seed: same audio"
    assert not np.array_equal(perturb(clip, copy_rng("a.wav", 3, 1), aug), outs[3]), "another seed differs"


def test_copies_are_made_once_deterministic_and_keep_their_rows(data):
    folder, meta = data
    aug = EarAugment(copies=2)
    out_dir, copies = ensure_copies(folder, meta, aug, progress=False)
    assert out_dir == copies_dir(folder, aug) and out_dir.parent.name == "cache"
    assert len(copies) == 2 * len(meta)
    assert list(copies["filename"][:2]) == [copy_name("clip0.wav", 0), copy_name("clip0.wav", 1)]
    merged = copies.merge(meta, left_on="source", right_on="filename", suffixes=("", "_src"))
    for col in ("task", "expected_text", "grade", "score", "fold"):
        assert (merged[col] == merged[f"{col}_src"]).all(), col
    digests = {n: _digest(out_dir / n) for n in copies["filename"]}
    stamps = {n: (out_dir / n).stat().st_mtime_ns for n in copies["filename"]}
    ensure_copies(folder, meta, aug, progress=False)
    assert {n: (out_dir / n).stat().st_mtime_ns for n in copies["filename"]} == stamps, "a rerun writes nothing"
    victim = copies["filename"][3]
    (out_dir / victim).unlink()
    ensure_copies(folder, meta, aug, progress=False)
    assert _digest(out_dir / victim) == digests[victim], "a remade copy has the same bytes"
    one = ensure_copies(folder, meta, EarAugment(copies=1), progress=False)[1]
    assert one["filename"].tolist() == copies["filename"][::2].tolist(), "copy 0 is the same whatever the count"
    audio = load_audio(out_dir / copies["filename"][0])
    assert audio.size > 0 and not np.allclose(audio[:1000], load_audio(folder / "clip0.wav")[:1000], atol=1e-3)


def test_an_unreadable_clip_gets_no_copies(data, caplog):
    folder, meta = data
    (folder / "clip1.wav").write_bytes(b"")
    _, copies = ensure_copies(folder, meta, EarAugment(copies=1), progress=False)
    assert copies["source"].tolist() == ["clip0.wav", "clip2.wav"]
    assert "clip1.wav" in caplog.text


@pytest.mark.parametrize("kwargs", [{"copies": -1}, {"speed_min": 0.0}, {"speed_min": 1.3},
                                    {"snr_db_min": 20.0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        EarAugment(**kwargs)


def test_the_folder_key_ignores_the_count_only():
    assert EarAugment(copies=1).key() == EarAugment(copies=3).key()
    assert EarAugment(seed=1).key() != EarAugment().key()
    assert EarAugment(snr_db_max=10.0).key() != EarAugment().key()


def test_a_share_of_the_clips_gets_copies_the_same_ones_every_time(data):
    folder, meta = data
    names = [f"clip{i}.wav" for i in range(400)]
    half = [n for n in names if gets_copies(n, EarAugment(share=0.5))]
    assert 150 < len(half) < 250, len(half)
    assert half == [n for n in names if gets_copies(n, EarAugment(share=0.5))], "deterministic"
    quarter = {n for n in names if gets_copies(n, EarAugment(share=0.25))}
    assert quarter < set(half), "a smaller share keeps only clips a larger one picked"
    assert {n for n in names if gets_copies(n, EarAugment(share=0.5, seed=1))} != set(half), "the seed picks"
    assert all(gets_copies(n, EarAugment()) for n in names)
    every = ensure_copies(folder, meta, EarAugment(), progress=False)[1]
    seed = next(s for s in range(50) if 0 < sum(gets_copies(n, EarAugment(share=0.5, seed=s))
                                                for n in meta["filename"]) < len(meta))
    aug = EarAugment(share=0.5, seed=seed)
    some = ensure_copies(folder, meta, aug, progress=False)[1]
    picked = [n for n in meta["filename"] if gets_copies(n, aug)]
    assert some["source"].tolist() == picked and 0 < len(picked) < len(meta)
    assert list(some.columns) == list(every.columns)
    assert EarAugment(share=0.5).key() == EarAugment().key(), "the same copies, one folder"
    none = ensure_copies(folder, meta.iloc[:0], EarAugment(), progress=False)[1]
    assert len(none) == 0 and list(none.columns) == list(every.columns), "no rows: an empty table, every column"
    with pytest.raises(ValueError):
        EarAugment(share=0.0)


def _cached_copies(store_dir, names, params):
    """A cache another reader kept in the copies' folder (the fold ears' encoder outputs), reopened."""
    store = FeatureStore(store_dir, "reader", params)
    store.add_many((n, np.ones((3, params.n_mels), np.float16)) for n in names)
    return FeatureStore(store_dir, "reader", params)


def test_a_later_caller_of_the_copies_keeps_what_an_earlier_one_cached(data):
    """The fold ears make copies of the clips scored 1 and cache their encoder outputs in the copies'
    folder; model6asr's own copies of every clip come later, and featurizing them syncs the folder's
    caches (clip_digests). A copy the folder's manifest had never seen was forgotten there: the ears'
    encoder outputs of every copy scored 1 were lost, and each fold computed them again."""
    root, meta = data
    aug = EarAugment()
    folder, first = ensure_copies(root, meta[meta["score"] == 1], aug, progress=False)
    params = FeatureParams(n_mels=4)
    _cached_copies(cache_dir(folder), first["filename"].tolist(), params)
    folder, every = ensure_copies(root, meta, aug, progress=False)
    ensure_clip_features(folder, every["filename"].tolist(), progress=False)
    kept = FeatureStore(cache_dir(folder), "reader", params)
    assert len(first) and all(name in kept for name in first["filename"])


def test_a_copy_whose_audio_changed_is_still_forgotten(data):
    """The manifest that keeps a copy's cached values is the one that notices a changed copy."""
    root, meta = data
    aug = EarAugment()
    folder, copies = ensure_copies(root, meta, aug, progress=False)
    params = FeatureParams(n_mels=4)
    _cached_copies(cache_dir(folder), copies["filename"].tolist(), params)
    changed = copies["filename"].iloc[0]
    write_wav(folder / changed, _tone(0.5, 100.0))
    ensure_copies(root, meta, aug, progress=False)
    kept = FeatureStore(cache_dir(folder), "reader", params)
    assert changed not in kept and all(n in kept for n in copies["filename"].iloc[1:])


class _CountingEncoder:
    """A window encoder that counts what it encodes: [B, n_mels, frames] -> [B, frames // 2, 4]."""
    key = "counting"
    batch_size = 1

    def __init__(self):
        self.calls = 0

    def __call__(self, mels):
        self.calls += len(mels)
        return np.zeros((len(mels), mels.shape[2] // 2, 4), np.float32)


def test_the_encoder_cache_computes_a_clip_another_step_made_it_forget(data):
    """An EncoderCache opened before a sync dropped a clip (clip_digests.forget_clips) must not take the
    clip as cached: the store's index is read again before deciding what to compute."""
    root, meta = data
    names = meta["filename"].tolist()
    config = SimpleNamespace(max_source_positions=1500, num_mel_bins=80, d_model=4)
    encoder = _CountingEncoder()
    cache = EncoderCache(encoder, config, root, margin_s=1.0)
    assert cache.ensure(names, progress=False) == len(names)
    forget_clips(root, {names[0]})
    assert cache.ensure(names, progress=False) == 1 and names[0] in cache and encoder.calls == len(names) + 1
