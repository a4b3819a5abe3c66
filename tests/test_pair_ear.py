"""The pair classifier reads the fold ear (`--ear_evidence`, members/pair/ear.py).

- The ear's evidence becomes the head's inputs with its gaps set to 0 and flagged, and a row without
  evidence is an error naming it.
- Inside a fold, every row (held-out rows included) carries the evidence of the ear of its own fold,
  which never heard it; the held-out rows' logits move with that evidence (the head reads it).
- Through train.py, infer.py and make_submission.py on a tiny demo set: the checkpoint names the ear of
  every fold, it is kept in the assets folder and shipped, test rows are read by it, and a missing ear
  is named.
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
from readaloud.members.gbm import fold_ears
from readaloud.members.pair import ear as pair_ear
from readaloud.members.registry import member_named
from readaloud.variants import variant_config
from readaloud.whisper import adapt

EAR_OPTIONS = ["--ear_evidence", "true", "--asr_ear_epochs", "1", "--asr_ear_copies", "0", "--epochs", "1"]


def test_ear_inputs_fill_gaps_and_flag_them():
    names = asr.FEATURE_NAMES
    X = np.arange(3 * len(names), dtype=np.float32).reshape(3, len(names)) + 1
    X[1, names.index("tr_mean_logp")] = np.nan      # an empty transcript has no log p of its own
    X[2] = np.nan                                     # a row the ear could not read
    table = asr.AsrTable(X, np.array([True, True, False]), ["a", "", ""], [[], [], []])
    got = pair_ear.ear_inputs(table)
    assert got.shape == (3, pair_ear.EAR_INPUTS) and np.isfinite(got).all()
    assert np.array_equal(got[0, :len(names)], X[0])
    assert got[1, names.index("tr_mean_logp")] == 0 and got[1, -1] == 1 and got[1, -2] == 1
    assert not got[2].any(), "an unread row is all zeros, its ok flag included"
    with pytest.raises(KeyError, match="c9.wav"):
        pair_ear.rows_of({"c0.wav": got[0]}, pd.DataFrame({"filename": ["c0.wav", "c9.wav"]}))


def test_the_pair_variants_read_the_ear_and_ship_its_backbone():
    pair = member_named("pair")
    for name in ("model1mean", "model2attn", "model3mapd"):
        cfg = variant_config(name)
        assert cfg.model.ear_evidence, name
        assert pair.backbones_read(cfg) == {"whisper-tiny.en", cfg.model.asr_ear_backbone}
    assert not variant_config("model3mapd", {"backbone": "scratch"}).model.ear_evidence, \
        "the from-scratch option reads no pretrained Whisper"


def test_the_plan_times_the_pairs_ears_as_a_stage_of_their_own():
    from readaloud.pipeline.plan import FOLD_EARS_STAGE, cache_variants
    stages = cache_variants(variant_config("model3mapd"))
    assert [name for name, _ in stages] == [FOLD_EARS_STAGE, "shared caches"]
    assert not stages[1][1].model.ear_evidence, "the rest of the caches is timed without training the ears again"
    assert [name for name, _ in cache_variants(variant_config("model3mapd", {"ear_evidence": False}))] == ["shared caches"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, root):
    base = tmp_path_factory.mktemp("pair_ear")
    data, tts = preprocessed_demo(root, base, 20, 5, 7)
    return {"root": root, "base": base, "data": data, "tts": tts}


def test_each_row_carries_its_own_folds_ear_and_the_head_reads_it(demo, monkeypatch):
    """A fold's training rows and held-out rows alike carry the evidence of the ear of their own fold
    (fake ears: the evidence says which ear read the row); changing the held-out rows' evidence changes
    their logits."""
    from readaloud.members.base import FoldData
    from readaloud.pipeline.fold_run import load_fold_data
    cfg = variant_config("model3mapd", {"epochs": 1})
    data: FoldData = load_fold_data("model3mapd", 0, cfg, demo["data"], demo["tts"], 2, progress=False)
    folds = sorted(set(data.meta["fold"]))

    class FakeEars:
        recipe = fold_ears.recipe_of(cfg.model)
        dirs = {k: f"ear{k}" for k in [*folds, fold_ears.ALL]}

        def table(self, meta, data_dir, progress=True):
            X = np.zeros((len(meta), len(asr.FEATURE_NAMES)), np.float32)
            X[:, 0] = meta["fold"].to_numpy() + 1          # "read by ear k"
            X[:, 1] = meta["score"].to_numpy() + np.arange(len(meta)) % 3   # something the label moves
            return asr.AsrTable(X, np.ones(len(meta), bool), [""] * len(meta), [[] for _ in range(len(meta))])
    monkeypatch.setattr(pair_ear, "train_fold_ears", lambda *a, **k: FakeEars())
    _, rows = pair_ear.fold_ear_inputs(data)
    member = member_named("pair")
    member.ear_rows = rows
    model, vocab = member.build(data)
    for part in (data.train_meta, data.valid_meta):
        ds = member.dataset(part, data, model, vocab)
        assert len(ds) and np.array_equal(ds.ear[:, 0], ds.meta["fold"].to_numpy() + 1)
        assert "ear" in ds.collate([ds.item(0), ds.item(1)])
    # the network starts as the ear's own score (a logistic regression fitted on the fold's training rows)
    train = member.training_rows(data)
    member.ear_prior = pair_ear.fit_ear_prior(pair_ear.rows_of(rows, train), train["score"].to_numpy())
    model, vocab = member.build(data)
    valid = member.dataset(data.valid_meta, data, model, vocab)
    model.eval()
    with torch.no_grad():
        before = model(valid.collate([valid.item(i) for i in range(len(valid))]))["logits"]
        assert np.allclose(before.numpy(), member.ear_prior.logits(valid.ear), atol=1e-4)
        valid.ear[:, 1] += 3.0
        after = model(valid.collate([valid.item(i) for i in range(len(valid))]))["logits"]
    assert not torch.allclose(before, after), "the logit ignores the ear's evidence"


def test_the_ears_prior_is_a_logistic_regression_and_a_single_label_is_its_rate():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, pair_ear.EAR_INPUTS)).astype(np.float32)
    X[:, 3] = 5.0                                       # a constant input: scale 1, weight 0
    y = (X[:, 0] + 0.3 * rng.normal(size=200) > 0).astype(int)
    prior = pair_ear.fit_ear_prior(X, y)
    assert prior.weight[0] > 1 and prior.weight[3] == 0
    p = 1 / (1 + np.exp(-prior.logits(X)))
    assert -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean() < 0.4
    again = pair_ear.fit_ear_prior(X, y)
    assert np.array_equal(again.weight, prior.weight), "the same rows give the same prior"
    ones = pair_ear.fit_ear_prior(X[:5], np.ones(5))
    assert not ones.weight.any() and ones.bias == pytest.approx(np.log(0.98 / 0.02))


def test_model3mapd_reading_the_ear_trains_infers_and_packs(demo, tmp_path):
    root, data, tts = demo["root"], demo["data"], demo["tts"]
    assets = tmp_path / "assets"
    train_folds(root, data, tts, assets, "model3mapd", *EAR_OPTIONS)
    cks = [safe_load(assets / f"model3mapd_{k}.pth") for k in (0, 1)]
    assert all(json.loads(ck["config"])["model"]["ear_evidence"] for ck in cks)
    keys = {str(ck["fold_ear"]) for ck in cks}
    assert len(keys) == 1, "every fold reads test rows with the ear of every fold"
    key = keys.pop()
    assert adapt.is_ear(assets / "ears" / key)
    assert {p.name for p in fold_ears.ears_root(data).iterdir() if adapt.is_ear(p)} >= {key}
    run_script(root, "get_config.py", "--data", data, "--assets", assets)
    out = run_script(root, "infer.py", "--data", data, "--assets", assets, "--tts_dir", tts, "--out", tmp_path / "sub.csv")
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert len(sub) == 5 and sub["score"].between(0, 1).all()
    assert "from 2/2 checkpoints" in out.stdout and "0 prior fallbacks" in out.stdout, out.stdout

    import make_submission
    assert make_submission.shipped_ears(assets, ["model3mapd_0.pth", "model3mapd_1.pth"]) == [assets / "ears" / key]

    # the ear gone: infer.py names it and still writes every row
    shutil.move(assets / "ears" / key, tmp_path / "moved")
    out = run_script(root, "infer.py", "--data", data, "--assets", assets, "--tts_dir", tts,
                     "--out", tmp_path / "sub2.csv", ok=False)
    assert key in out.stdout + out.stderr
    assert len(pd.read_csv(tmp_path / "sub2.csv")) == 5
