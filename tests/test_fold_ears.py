"""Fold ears (model6asr --asr_fold_ears): a Whisper decoder fine-tuned inside each fold.

- An ear never hears the clips it reads: ear k trains on the other folds' clips scored 1 only, and
  reads fold k's rows (fake fine-tuning, the routing is what is checked).
- An ear trained twice on the same rows is bit for bit the same; a finished ear is reused, not
  retrained; a changed label trains another.
- Through train.py, infer.py and make_submission.py on a tiny demo set: the checkpoint names its ear,
  the ear of every fold is kept in the assets folder and read for the test rows, a missing ear is
  named, and the packed zip ships it.
"""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import preprocessed_demo, run_script, train_folds
from readaloud.checkpoints import safe_load
from readaloud.members.gbm import evidence as asr
from readaloud.config import ConfigError
from readaloud.members.gbm import fold_ears
from readaloud.members.gbm import gbm
from readaloud.variants import variant_config
from readaloud.whisper import adapt

OPTIONS = ["--asr_backbones", "whisper-tiny.en", "--gbm_min_samples_leaf", "4", "--gbm_ear_copies", "0",
           "--asr_fold_ears", "true", "--asr_ear_epochs", "1"]


class FakeMemory:
    """An encoder cache that holds every clip: the routing tests need no encoder."""
    class store:
        name = "whisperenc_fake_0000000000"

    def __contains__(self, name):
        return True

    def ensure(self, names, progress=True):
        return 0

    def get(self, name):
        return np.zeros((3, 4), np.float16)

    def length(self, name):
        return 3


def test_an_ear_never_hears_the_clips_it_reads(tmp_path, monkeypatch):
    """Four folds: ear k trained on clips scored 1 of folds other than k and on their ear copies, and
    fold k's rows (its held-out rows, and the training rows of the other folds' trees alike) decoded
    by ear k alone; rows without a fold (test rows) by the ear of every fold. Would fail if a fold's
    clip, or a copy of it, reached the ear that reads it."""
    meta = pd.DataFrame({"filename": [f"c{i}.wav" for i in range(16)], "expected_text": ["a cat"] * 16,
                         "score": [1, 1, 0, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0], "fold": [i % 4 for i in range(16)]})
    for name in meta["filename"]:
        (tmp_path / name).write_bytes(name.encode())
    trained_on = {}

    def fake_fine_tune(recipe, memory, rows, progress=True):
        return sorted(rows["filename"])

    def fake_save(model, recipe, target, record):
        target.mkdir(parents=True)
        (target / "model.bin").write_text("x")
        (target / adapt.EAR_RECORD).write_text(json.dumps({"key": recipe.key()}))
        trained_on[target.name] = model
        return target
    monkeypatch.setattr(fold_ears, "fine_tune_decoder", fake_fine_tune)
    monkeypatch.setattr(fold_ears, "save_ct2", fake_save)
    monkeypatch.setattr(fold_ears, "memory_cache", lambda *a, **k: FakeMemory())

    def fake_copies(data_dir, rows, aug, progress=True):   # one copy per clip, with its source's fold and label
        return tmp_path / "copies", rows.assign(filename=rows["filename"].str.replace(".wav", ".ear0.wav"),
                                                source=rows["filename"])
    monkeypatch.setattr(fold_ears, "ensure_copies", fake_copies)
    recipe = adapt.EarRecipe()
    assert recipe.copies == 1, "ears train on copies of their clips by default"
    ears = fold_ears.train_fold_ears(recipe, tmp_path, meta, progress=False)
    assert sorted(ears.dirs) == [fold_ears.ALL, 0, 1, 2, 3]
    copy = lambda names: {n.replace(".wav", ".ear0.wav") for n in names}  # noqa: E731
    for k in range(4):
        heard = set(trained_on[ears.dirs[k].name])
        theirs = set(meta.loc[(meta["fold"] != k) & (meta["score"] == 1), "filename"])
        assert heard == theirs | copy(theirs)
        mine = set(meta.loc[meta["fold"] == k, "filename"])
        assert not heard & (mine | copy(mine)), f"ear {k} heard fold {k} or a copy of it"
    everyone = set(meta.loc[meta["score"] == 1, "filename"])
    assert set(trained_on[ears.dirs[fold_ears.ALL].name]) == everyone | copy(everyone)
    assert len({d.name for d in ears.dirs.values()}) == 5
    alone = fold_ears.train_fold_ears(adapt.EarRecipe(copies=0), tmp_path, meta, progress=False)
    assert set(trained_on[alone.dirs[0].name]) == set(meta.loc[(meta["fold"] != 0) & (meta["score"] == 1), "filename"])

    read_by = {}

    def fake_table(rows, data_dir, model, cache, progress=True, memory=None):
        for name in rows["filename"]:
            read_by[name] = model
        n = len(rows)
        return asr.AsrTable(np.zeros((n, len(asr.FEATURE_NAMES)), np.float32), np.ones(n, bool), [""] * n,
                            [[] for _ in range(n)])
    monkeypatch.setattr(asr, "asr_table", fake_table)
    monkeypatch.setattr(fold_ears, "ear_model", lambda folder, *a: folder)
    monkeypatch.setattr(fold_ears, "ear_cache_path", lambda *a: tmp_path / "cache.npz")
    table = ears.table(meta, tmp_path, progress=False)
    assert table.ok.all() and table.X.shape == (16, len(asr.FEATURE_NAMES))
    for name, fold in zip(meta["filename"], meta["fold"]):
        assert read_by[name] == ears.dirs[fold] and name not in trained_on[ears.dirs[fold].name]
    ears.table(meta.drop(columns=["fold"]), tmp_path, progress=False)
    assert all(read_by[n] == ears.dirs[fold_ears.ALL] for n in meta["filename"]), "test rows: the ear of every fold"

    # another label is another ear: the key follows what the ear trains on
    flipped = meta.assign(score=np.where(meta["filename"] == "c6.wav", 0, meta["score"]))
    again = fold_ears.train_fold_ears(recipe, tmp_path, flipped, progress=False)
    assert again.dirs[2] == ears.dirs[2], "fold 2's ear never trained on c6 (fold 2): reused"
    assert all(again.dirs[k] != ears.dirs[k] for k in (0, 1, 3, fold_ears.ALL)), "the others trained on it"
    assert "c6.wav" not in trained_on[again.dirs[0].name] and "c6.ear0.wav" not in trained_on[again.dirs[0].name]


def test_layout_names_the_fold_ear_block():
    layout = gbm.FeatureLayout.of(variant_config("model6asr").model)
    plain = gbm.FeatureLayout.of(variant_config("model6asr", {"asr_fold_ears": False}).model)
    assert layout.fold_ear and not plain.fold_ear, "model6asr reads a fold ear by default"
    assert layout.names == plain.names[:-2] + [f"asr_ear_{n}" for n in asr.FEATURE_NAMES] + plain.names[-2:]
    assert set(layout.names) - set(layout.without_vocabulary().names) == \
        set(plain.names) - set(plain.without_vocabulary().names), "the new-word trees read the ear too"


def test_the_ear_agreement_block_compares_the_ear_with_the_frozen_whisper():
    """--asr_ear_agreement: after the ear's block, the word and phoneme edit rates of the ear's transcript
    against the first frozen backbone's; refused without fold ears."""
    layout = gbm.FeatureLayout.of(variant_config("model6asr", {"asr_ear_agreement": True}).model)
    plain = gbm.FeatureLayout.of(variant_config("model6asr").model)
    assert layout.names == plain.names[:-2] + ["asr_agree_ear_word_edit_rate", "asr_agree_ear_phone_edit_rate"] \
        + plain.names[-2:]
    with pytest.raises(ConfigError, match="asr_fold_ears"):
        gbm.FeatureLayout.of(variant_config("model6asr", {"asr_ear_agreement": True, "asr_fold_ears": False}).model)
    meta = pd.DataFrame({"filename": ["a.wav", "b.wav"], "task": ["t", "t"], "expected_text": ["six nine two"] * 2,
                         "grade": ["1", "1"]})
    width = len(asr.FEATURE_NAMES)
    frozen = asr.AsrTable(np.zeros((2, width)), np.array([True, True]), ["6, 9, 2", "six nine two"], [[], []])
    ear = asr.AsrTable(np.ones((2, width)), np.array([True, True]), ["Six six nine two.", "Six nine two."], [[], []])
    small = gbm.FeatureLayout(alignment=False, asr_backbones=("whisper-base",), fold_ear=True, ear_agreement=True)
    X, ok = small.table(meta, ["t"], None, [frozen], ear_table=ear)
    assert X.shape == (2, len(small.names)) and ok.all()
    agree = X[:, small.names.index("asr_agree_ear_word_edit_rate")]
    assert agree[1] == 0.0, "the same words, however written"
    assert agree[0] == pytest.approx(1 / 3), "the ear doubled the first word: one insertion in three words"


def test_the_ears_seed_is_an_option_and_the_default_keeps_its_key():
    """--asr_ear_seed reaches the ear's recipe (and so its key: another seed trains other ears); the default
    recipe is the one every ear before the option was trained by."""
    default = fold_ears.recipe_of(variant_config("model6asr", {}).model)
    assert default == adapt.EarRecipe() and default.key() == "c637b3cefb"
    seeded = fold_ears.recipe_of(variant_config("model6asr", {"asr_ear_seed": 3}).model)
    assert seeded.seed == 3 and seeded.key() != default.key()


def test_the_ears_backbone_is_shipped_with_the_member():
    """The ear decodes from its backbone's encoder output: make_submission.py ships that backbone with
    model6asr even where no model8decoder reads it."""
    from readaloud.members.registry import member_named
    gbm_member = member_named("gbm")
    assert gbm_member.backbones_read(variant_config("model6asr")) == {"whisper-base", "whisper-tiny.en"}
    assert gbm_member.backbones_read(variant_config("model6asr", {"asr_fold_ears": False})) == {"whisper-base"}
    assert member_named("whisperdec").backbones_read(variant_config("model8decoder")) == {"whisper-tiny.en"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory, root):
    base = tmp_path_factory.mktemp("ears")
    data, tts = preprocessed_demo(root, base, 20, 5, 5)
    return {"root": root, "base": base, "data": data, "tts": tts}


def test_an_ear_trained_twice_is_the_same_and_a_finished_one_is_reused(demo, tmp_path, monkeypatch):
    """The real fine-tuning, one epoch on the demo's clips scored 1: the same weights bit for bit when
    trained again, and ensure_ear reuses a finished ear instead of training it again."""
    meta = pd.read_csv(demo["data"] / "train_metadata.csv").merge(pd.read_csv(demo["data"] / "train_labels.csv"))
    rows = meta[meta["score"] == 1].head(6)
    recipe = adapt.EarRecipe(epochs=1)
    memory = fold_ears.memory_cache(recipe, demo["data"])
    memory.ensure(rows["filename"].tolist(), progress=False)
    first = adapt.fine_tune_decoder(recipe, memory, rows, progress=False).state_dict()
    second = adapt.fine_tune_decoder(recipe, memory, rows, progress=False).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    untouched = adapt.fine_tune_decoder(adapt.EarRecipe(epochs=1, lr=1e-12), memory, rows, progress=False)
    assert not all(torch.equal(first[k], untouched.state_dict()[k]) for k in first), "fine-tuning moved the decoder"
    ear = fold_ears.ensure_ear(recipe, demo["data"], rows, memory, tmp_path / "ears", progress=False)
    assert adapt.is_ear(ear) and (ear / "tokenizer.json").is_file()
    assert json.loads((ear / adapt.EAR_RECORD).read_text())["key"] == recipe.key()
    monkeypatch.setattr(fold_ears, "fine_tune_decoder", lambda *a, **k: pytest.fail("a finished ear was retrained"))
    assert fold_ears.ensure_ear(recipe, demo["data"], rows, memory, tmp_path / "ears", progress=False) == ear
    # the ear decodes from the cached encoder output, like a pretrained Whisper folder
    table = asr.asr_table(rows, demo["data"], asr.WhisperEvidence(ear, threads=1), None, progress=False,
                          memory=memory)
    assert table.ok.all() and np.isfinite(table.X[:, asr.FEATURE_NAMES.index("exp_mean_logp")]).all()


def test_model6asr_with_fold_ears_trains_infers_and_packs(demo, tmp_path):
    root, data, tts = demo["root"], demo["data"], demo["tts"]
    assets = tmp_path / "assets"
    train_folds(root, data, tts, assets, "model6asr", *OPTIONS)
    keys = {str(safe_load(assets / f"model6asr_{k}.pth")["fold_ear"]) for k in (0, 1)}
    assert len(keys) == 1, "every fold reads test rows with the same ear (of every fold)"
    key = keys.pop()
    assert adapt.is_ear(assets / "ears" / key)
    ck = safe_load(assets / "model6asr_0.pth")
    assert [n for n in ck["feature_names"] if n.startswith("asr_ear_")], "the trees read the ear's block"
    trained = {p.name for p in fold_ears.ears_root(data).iterdir() if adapt.is_ear(p)}
    assert key in trained and len(trained) == 3, "one ear per fold and one of every fold"
    run_script(root, "get_config.py", "--data", data, "--assets", assets)
    out = run_script(root, "infer.py", "--data", data, "--assets", assets, "--tts_dir", tts, "--out", tmp_path / "sub.csv",
                     "--explain")
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert len(sub) == 5 and sub["score"].between(0, 1).all()
    assert "from 2/2 checkpoints" in out.stdout and "0 prior fallbacks" in out.stdout, out.stdout
    # the teachers' word evidence is the ear's: the transcripts the trees read for the test rows
    explained = pd.read_csv(tmp_path / "sub_explain.csv")
    assert explained["backbone"].str.startswith(f"fold ear {key}").all(), explained["backbone"].tolist()
    test = pd.read_csv(data / "test_metadata.csv")
    table = fold_ears.FoldEars(adapt.EarRecipe(epochs=1, copies=0), {fold_ears.ALL: assets / "ears" / key}).table(
        test, data, progress=False)
    heard = dict(zip(test["filename"], table.transcripts))
    assert [heard[f] for f in explained["filename"]] == explained["transcript"].fillna("").tolist()

    # the ear gone: infer.py names it, drops the member's checkpoints and still writes every row
    moved = tmp_path / "moved"
    shutil.move(assets / "ears" / key, moved)
    out = run_script(root, "infer.py", "--data", data, "--assets", assets, "--tts_dir", tts,
                     "--out", tmp_path / "sub2.csv", ok=False)
    assert key in out.stdout + out.stderr and "fold ear" in out.stdout + out.stderr
    assert len(pd.read_csv(tmp_path / "sub2.csv")) == 5
    shutil.move(moved, assets / "ears" / key)

    import make_submission
    assert make_submission.shipped_ears(assets, ["model6asr_0.pth", "model6asr_1.pth"]) == [assets / "ears" / key]


def test_an_ear_whose_top_encoder_layer_adapts(demo, tmp_path):
    """--asr_ear_encoder_layers 1: the ear reads the torch encoder's lower layers, cached once per clip, through
    its own top layer. Through the pretrained top layer that is the frozen encoder's output (the decoder-only
    ear's cache); fine-tuning moves the top layer and the decoder, the same bit for bit when trained again;
    the saved ear carries its top layer, and decodes through it. The decoder-only ears keep their keys (those of
    the ears trained before the option)."""
    from transformers import WhisperForConditionalGeneration
    from readaloud.whisper.backbones import transformers_dir
    assert adapt.EarRecipe().key() == "c637b3cefb" and adapt.EarRecipe(epochs=1, copies=0).key() == "037ea8fa69"
    meta = pd.read_csv(demo["data"] / "train_metadata.csv").merge(pd.read_csv(demo["data"] / "train_labels.csv"))
    rows = meta[meta["score"] == 1].head(6)
    recipe = adapt.EarRecipe(epochs=1, copies=0, encoder_layers=1)
    assert recipe.key() != adapt.EarRecipe(epochs=1, copies=0).key()
    lower = fold_ears.memory_cache(recipe, demo["data"])
    frozen = fold_ears.memory_cache(adapt.EarRecipe(epochs=1, copies=0), demo["data"])
    names = rows["filename"].tolist()
    lower.ensure(names, progress=False)
    frozen.ensure(names, progress=False)
    assert "_below3" in lower.store.name and lower.store.name != frozen.store.name
    pretrained = WhisperForConditionalGeneration.from_pretrained(transformers_dir(recipe.backbone)).eval()
    through = adapt.AdaptedMemory(lower, adapt.EncoderTop.of(pretrained, 1))
    for name in names:   # the top layer attends over the clip + 1 s only, not the whole padded window: close, not equal
        a, b = through.get(name), np.asarray(frozen.get(name), np.float32)
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert a.shape == b.shape and np.abs(a - b).mean() < 0.2 * np.abs(b).mean() and cosine.mean() > 0.98, \
            (name, np.abs(a - b).mean(), cosine.mean())

    first = adapt.fine_tune_decoder(recipe, lower, rows, progress=False).state_dict()
    second = adapt.fine_tune_decoder(recipe, lower, rows, progress=False).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    before = pretrained.state_dict()
    top_keys = [k for k in first if k.startswith("model.encoder.layers.3.")]
    assert top_keys and not all(torch.equal(first[k], before[k]) for k in top_keys), "the top layer adapted"
    assert all(torch.equal(first[k], before[k]) for k in first if k.startswith("model.encoder.layers.2.")), \
        "the layers below stay frozen"

    ear = fold_ears.ensure_ear(recipe, demo["data"], rows, lower, tmp_path / "ears", progress=False)
    assert (ear / adapt.TOP_FILE).is_file() and adapt.ear_recipe(ear) == recipe
    loaded = adapt.load_top(ear).state_dict()
    assert all(torch.equal(loaded[f"layers.0.{k[len('model.encoder.layers.3.'):]}"], first[k]) for k in top_keys)
    table = fold_ears.FoldEars(recipe, {fold_ears.ALL: ear}).table(rows.drop(columns="score"), demo["data"],
                                                                   progress=False)
    assert table.ok.all() and np.isfinite(table.X[:, asr.FEATURE_NAMES.index("exp_mean_logp")]).all()
    assert adapt.load_top(fold_ears.ensure_ear(adapt.EarRecipe(epochs=1, copies=0), demo["data"], rows, frozen,
                                               tmp_path / "ears", progress=False)) is None


def test_model6asr_with_adapted_encoder_layers_trains_and_infers(demo, tmp_path):
    root, data, tts = demo["root"], demo["data"], demo["tts"]
    assets = tmp_path / "assets"
    out = run_script(root, "train.py", "--data", data, "--assets", assets, "--tts_dir", tts, "--n_folds", 2,
                     "--models", "model6asr", "--jobs", 1, *OPTIONS, "--asr_ear_encoder_layers", "1")
    assert "2/2 folds finished" in out.stdout
    key = str(safe_load(assets / "model6asr_0.pth")["fold_ear"])
    assert (assets / "ears" / key / adapt.TOP_FILE).is_file(), "the published ear carries its top layer"
    run_script(root, "get_config.py", "--data", data, "--assets", assets)
    out = run_script(root, "infer.py", "--data", data, "--assets", assets, "--tts_dir", tts, "--out", tmp_path / "sub.csv")
    assert "0 prior fallbacks" in out.stdout and len(pd.read_csv(tmp_path / "sub.csv")) == 5, out.stdout
