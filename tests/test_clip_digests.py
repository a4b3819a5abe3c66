"""Caches follow the clips' content (prep/clip_digests.py): a clip whose file changed, or that the
manifest has never seen, is forgotten in every cache of its folder (feature stores, npz tables of
every key layout, the bad-clip list, ear copies and their own caches); other clips and the fold
files stay as they were."""
import io

import numpy as np
import pandas as pd

from readaloud.features import FeatureParams, FeatureStore
from readaloud.layout import bad_clips_path, cache_dir
from readaloud.prep.clip_digests import clip_digest, sync_clip_caches


def write_npz(path, **arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def fill_caches(folder):
    cache = cache_dir(folder)
    store = FeatureStore(cache, "clips_test", FeatureParams(n_mels=4))
    store.add_many([(n, np.ones((3, 4), np.float32)) for n in ("a.wav", "b.wav")])
    write_npz(cache / "asr_test.npz", feature_names=np.array(["x", "y", "z"]),
              clip_keys=np.array(["a.wav", "b.wav"]), clip_stats=np.zeros((2, 2)),
              row_keys=np.array(["a.wav\tcat", "a.wav\tdog", "b.wav\tcat"]), row_X=np.arange(9.0).reshape(3, 3))
    write_npz(cache / "closed_test.npz", keys=np.array(["a.wav\tv1", "b.wav\tv1"]),
              transcripts=np.array(["cat", "dog"]), logp=np.zeros((2, 2)))
    pd.DataFrame({"filename": ["a.wav", "b.wav"], "fold": [0, 1]}).to_csv(cache / "folds_2.csv", index=False)
    pd.DataFrame({"filename": ["b.wav"], "error": ["bad"]}).to_csv(bad_clips_path(folder), index=False)
    copies = cache / "ear_test"
    copies.mkdir()
    for name in ("a.ear0.wav", "b.ear0.wav"):
        (copies / name).write_bytes(b"copy")
    FeatureStore(cache_dir(copies), "clips_test", FeatureParams(n_mels=4)).add_many(
        [(n, np.ones((2, 4), np.float32)) for n in ("a.ear0.wav", "b.ear0.wav")])


def test_a_changed_clip_is_forgotten_everywhere_and_nothing_else(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.wav").write_bytes(b"first a")
    (folder / "b.wav").write_bytes(b"first b")
    assert sync_clip_caches(folder, ["a.wav", "b.wav"]) == [], "nothing cached yet, nothing changed"
    fill_caches(folder)
    assert sync_clip_caches(folder, ["a.wav", "b.wav"]) == [], "same content: every cache kept"
    cache = cache_dir(folder)
    assert FeatureStore(cache, "clips_test", FeatureParams(n_mels=4)).keys() == ["a.wav", "b.wav"]

    (folder / "a.wav").write_bytes(b"other audio under the same name")
    assert sync_clip_caches(folder, ["a.wav", "b.wav"]) == ["a.wav"]
    assert FeatureStore(cache, "clips_test", FeatureParams(n_mels=4)).keys() == ["b.wav"]
    with np.load(cache / "asr_test.npz") as z:
        assert z["clip_keys"].tolist() == ["b.wav"] and z["row_keys"].tolist() == ["b.wav\tcat"]
        assert z["row_X"].tolist() == [[6.0, 7.0, 8.0]] and z["clip_stats"].shape == (1, 2)
        assert z["feature_names"].tolist() == ["x", "y", "z"], "arrays of no key group are kept"
    with np.load(cache / "closed_test.npz") as z:
        assert z["keys"].tolist() == ["b.wav\tv1"] and z["transcripts"].tolist() == ["dog"]
    assert pd.read_csv(cache / "folds_2.csv")["filename"].tolist() == ["a.wav", "b.wav"], "folds are no cache"
    assert not (cache / "ear_test" / "a.ear0.wav").exists() and (cache / "ear_test" / "b.ear0.wav").exists()
    assert FeatureStore(cache_dir(cache / "ear_test"), "clips_test", FeatureParams(n_mels=4)).keys() == ["b.ear0.wav"]
    manifest = pd.read_csv(cache / "clip_digests.csv")
    assert dict(zip(manifest["filename"], manifest["digest"]))["a.wav"] == clip_digest(folder / "a.wav")

    (folder / "b.wav").unlink()
    assert sync_clip_caches(folder, ["b.wav"]) == ["b.wav"], "a deleted clip is forgotten too"
    assert bad_clips_path(folder).read_text().strip() == "filename,error"
    assert FeatureStore(cache, "clips_test", FeatureParams(n_mels=4)).keys() == []


def test_caches_written_before_the_manifest_are_not_trusted(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.wav").write_bytes(b"a")
    (folder / "b.wav").write_bytes(b"b")
    fill_caches(folder)     # no manifest: nothing vouches for these entries
    assert sync_clip_caches(folder, ["a.wav"]) == [], "unseen is not 'changed'"
    keys = FeatureStore(cache_dir(folder), "clips_test", FeatureParams(n_mels=4)).keys()
    assert keys == ["b.wav"], "a.wav recomputed from its file; b.wav was not listed, so not checked"
