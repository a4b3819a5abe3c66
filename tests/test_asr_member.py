"""model6asr: the ASR evidence of a pretrained Whisper as features of the gbm member, and
infer.py --explain.

A tiny demo set goes through train.py (one model6asr per fold, 2 folds, tiny.en only for speed):
the ASR evidence of every training clip is decoded once, before the folds start, and read back
by them (the cache file is not touched again); the checkpoint loads weights-only and names its
features; a fold retrained in this process gives the same trees without a decode; infer.py
predicts the test rows and --explain writes per row the expected words with their
probabilities, the transcript and the least likely word, a row with an empty expected text
included (a note, no crash)."""
import argparse
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_script
from readaloud.checkpoints import CheckpointError, atomic_save, safe_load
from readaloud.config import ConfigError
from readaloud.members.gbm import gbm
from readaloud.members.gbm.alignment import FEATURE_NAMES as ALIGNMENT_NAMES
from readaloud.members.registry import member_named
from readaloud.members.gbm.ear_augment import EarAugment, copies_dir
from readaloud.variants import variant_config
from readaloud.members.gbm import evidence as asr
from readaloud.members.gbm.closed import CLOSED_FEATURE_NAMES, CLOSED_LOGP_NAMES
from readaloud.members.gbm.loops import LOOP_FEATURE_NAMES
from readaloud.members.gbm.prompted import PROMPT_FEATURE_NAMES

BACKBONE = "whisper-tiny.en"
# the frozen evidence alone (the fold ears have their own tests: test_fold_ears.py)
OPTIONS = ["--asr_backbones", BACKBONE, "--gbm_min_samples_leaf", "4",  # 10 training clips a fold: let trees split
           "--gbm_ear_copies", "1", "--asr_new_word_trees", "true", "--asr_fold_ears", "false"]
OVERRIDES = {"asr_backbones": BACKBONE, "gbm_min_samples_leaf": 4, "gbm_ear_copies": 1, "asr_new_word_trees": True,
             "asr_fold_ears": False}


@pytest.fixture
def decodes(monkeypatch):
    """Counts the clips Whisper decodes (greedy transcripts) in this process."""
    seen = []
    real = asr.WhisperEvidence.decode

    def counting(self, encoded):
        seen.append(int(encoded.shape[0]))
        return real(self, encoded)
    monkeypatch.setattr(asr.WhisperEvidence, "decode", counting)
    return seen


@pytest.fixture(scope="module")
def trained(tmp_path_factory, root):
    """Demo data (20 training, 5 test clips), preprocessed into 2 folds; the shared caches filled
    here (decodes counted), then model6asr trained through train.py."""
    base = tmp_path_factory.mktemp("asr")
    data, assets, tts = base / "data", base / "assets", base / "tts"
    run_script(root, "make_demo_data.py", "--out", data, "--n-train", 20, "--n-test", 5, "--seed", 5)
    run_script(root, "preprocess.py", "--data", data, "--tts_dir", tts, "--n_folds", 2, "--workers", 1)
    from readaloud.pipeline.runner import prepare_for_jobs
    cfg = variant_config("model6asr", OVERRIDES)
    counts = []
    with pytest.MonkeyPatch.context() as m:
        real = asr.WhisperEvidence.decode
        m.setattr(asr.WhisperEvidence, "decode", lambda self, enc: counts.append(int(enc.shape[0])) or real(self, enc))
        prepare_for_jobs(data, tts, 2, [cfg], progress=False)
        first = sum(counts)
        prepare_for_jobs(data, tts, 2, [cfg], progress=False)
    cache = asr.asr_cache_path(data, gbm.evidence_model(BACKBONE))
    copies_cache = asr.asr_cache_path(copies_dir(data, EarAugment()), gbm.evidence_model(BACKBONE))
    stamp = cache.stat().st_mtime_ns, copies_cache.stat().st_mtime_ns
    out = run_script(root, "train.py", "--data", data, "--assets", assets, "--tts_dir", tts, "--n_folds", 2,
                     "--models", "model6asr", "--jobs", 2, *OPTIONS)
    return {"root": root, "data": data, "assets": assets, "tts": tts, "base": base, "train_out": out.stdout,
            "first_decodes": first, "second_decodes": sum(counts) - first, "cache": cache,
            "cache_untouched": (cache.stat().st_mtime_ns, copies_cache.stat().st_mtime_ns) == stamp}


def test_feature_layout_of_configs():
    assert gbm.FeatureLayout.of(variant_config("model5gbm").model).names == ALIGNMENT_NAMES, "model5gbm as before"
    layout = gbm.FeatureLayout.of(variant_config("model6asr").model)
    assert layout.alignment and layout.asr_backbones == ("whisper-base",), "model6asr's frozen Whisper is base"
    assert layout.fold_ear, "and its second ear is tiny.en adapted inside each fold"
    assert layout.closed, "model6asr decodes over the task's words by default"
    assert layout.closed_logp, "and reads how sure Whisper is of the closed transcript"
    assert layout.loops, "and how far its open and closed transcripts loop"
    assert layout.prompted, "and the expected text's log p after a prompt of the task's words"
    assert not layout.agreement, "one frozen Whisper: nothing to agree with"
    assert len(layout.names) == len(ALIGNMENT_NAMES) + len(asr.FEATURE_NAMES) + len(CLOSED_FEATURE_NAMES) \
        + len(CLOSED_LOGP_NAMES) + 2 * len(LOOP_FEATURE_NAMES) + len(PROMPT_FEATURE_NAMES) \
        + len(asr.FEATURE_NAMES), "base's blocks, then the ear's open transcript and log p"
    assert layout.names[-2:] == ["task_code", "grade_code"] and "asr_whisper-base_exact_match" in layout.names
    assert "asr_ear_exact_match" in layout.names and not any(n.startswith("asr_whisper-tiny") for n in layout.names)
    both = gbm.FeatureLayout.of(variant_config("model6asr", {"asr_backbones": "whisper-tiny.en,whisper-base",
                                                             "asr_agreement": True, "asr_fold_ears": False}).model)
    assert both.agreement and len(both.names) == len(ALIGNMENT_NAMES) + 2 * len(asr.FEATURE_NAMES) \
        + 2 * len(CLOSED_FEATURE_NAMES) + 2 * len(CLOSED_LOGP_NAMES) + 4 * len(LOOP_FEATURE_NAMES) \
        + 2 * len(PROMPT_FEATURE_NAMES) + 2 * len(gbm.AGREEMENT_NAMES), "the two frozen Whispers of before"
    assert [n for n in both.names if n.startswith("asr_agree_")] == [
        "asr_agree_whisper-base_word_edit_rate", "asr_agree_whisper-base_phone_edit_rate",
        "asr_agree_whisper-base_closed_word_edit_rate", "asr_agree_whisper-base_closed_phone_edit_rate"]
    one = gbm.FeatureLayout.of(variant_config("model6asr", {"asr_backbones": "whisper-tiny.en"}).model)
    assert not one.agreement, "one Whisper: nothing to agree with"
    without = gbm.FeatureLayout.of(variant_config("model6asr", {"asr_closed_vocab": False, "asr_agreement": True,
                                                                "asr_fold_ears": False,
                                                                "asr_backbones": "whisper-tiny.en,whisper-base"}).model)
    assert not without.closed and not without.prompted and len(without.names) == len(ALIGNMENT_NAMES) + 2 * len(asr.FEATURE_NAMES) \
        + 2 * len(LOOP_FEATURE_NAMES) + len(gbm.AGREEMENT_NAMES), "the open transcripts' loops and agreement only"
    only = gbm.FeatureLayout.of(variant_config("model6asr", {"gbm_features": "asr",
                                                             "asr_backbones": "/x/my-ct2"}).model)
    assert not only.alignment and only.names[0] == "asr_my-ct2_exact_match"
    with pytest.raises(ConfigError, match="gbm_features"):
        gbm.FeatureLayout.of(variant_config("model6asr", {"gbm_features": "alignment+text"}).model)
    with pytest.raises(ConfigError, match="asr_backbones"):
        gbm.FeatureLayout.of(variant_config("model6asr", {"asr_backbones": " , "}).model)
    with pytest.raises(ConfigError, match="share"):
        gbm.FeatureLayout.of(variant_config("model6asr", {"asr_backbones": "a/whisper-base,whisper-base"}).model)


def test_agreement_block_measures_how_far_two_ears_disagree():
    """agreement_block: 0 where both Whispers wrote the same words, the word edit rate where they did
    not, NaN where either has no transcript."""
    first = asr.AsrTable(np.zeros((3, 1)), np.array([True, True, False]), ["the cat sat", "the cat sat", "x"], [[]] * 3)
    other = asr.AsrTable(np.zeros((3, 1)), np.array([True, True, True]), ["The cat sat.", "hi my cousin", "x"],
                         [[]] * 3)
    block = gbm.agreement_block(first, other)
    assert block.shape == (3, len(gbm.AGREEMENT_NAMES))
    assert block[0].tolist() == [0.0, 0.0], "the same words, however written"
    assert block[1, 0] == pytest.approx(1.0) and block[1, 1] > 0.5
    assert np.isnan(block[2]).all()


def test_asr_cache_is_filled_once_before_the_folds(trained):
    n_train = len(pd.read_csv(trained["data"] / "train_metadata.csv"))
    assert trained["first_decodes"] == 2 * n_train, "each training clip and its ear copy decoded once"
    assert trained["second_decodes"] == 0, "a second preparation reads the cache"
    assert "2/2 folds finished" in trained["train_out"]
    assert trained["cache_untouched"], "neither train.py nor its folds decoded (or rewrote) anything"


def test_ear_copies_train_but_are_never_scored(trained):
    """Each fold's trees also fit one perturbed copy of every clip of the other fold; its OOF rows
    are its own real clips only."""
    folds = pd.read_csv(trained["data"] / "cache" / "folds_2.csv")
    for fold in (0, 1):
        summary = json.loads((trained["assets"] / f"model6asr_{fold}.json").read_text())
        n_other = int((folds["fold"] != fold).sum())
        assert summary["n_ear_copies"] == n_other and summary["n_train"] == 2 * n_other
        oof = pd.read_csv(trained["assets"] / f"model6asr_{fold}_oof.csv")
        assert sorted(oof["filename"]) == sorted(folds.loc[folds["fold"] == fold, "filename"])
        assert not oof["filename"].str.contains(".ear").any() and (oof["fallback"] == 0).all()


def test_a_rerun_of_finished_folds_prepares_nothing(trained, tmp_path):
    """train.py over finished folds skips them without making any shared input again: with the
    ear copies' folder gone it is not rebuilt (that would decode every copy for nothing)."""
    data, assets = tmp_path / "data", tmp_path / "assets"
    shutil.copytree(trained["data"], data)
    shutil.copytree(trained["assets"], assets)
    shutil.rmtree(copies_dir(data, EarAugment()))
    out = run_script(trained["root"], "train.py", "--data", data, "--assets", assets, "--tts_dir", trained["tts"],
                     "--n_folds", 2, "--models", "model6asr", *OPTIONS)
    assert out.stdout.count("finished already, skipped") == 2 and "2/2 folds finished" in out.stdout
    assert not copies_dir(data, EarAugment()).exists()


def test_checkpoint_is_weights_only_and_names_its_features(trained):
    layout = gbm.FeatureLayout.of(variant_config("model6asr", OVERRIDES).model)
    for fold in (0, 1):
        ck = safe_load(trained["assets"] / f"model6asr_{fold}.pth")  # torch.load(weights_only=True)
        assert ck["arch"] == "gbm" and ck["feature_names"] == layout.names
        assert ck["asr_version"] == asr.ASR_VERSION and len(ck["asr_weights"]) == 1
        assert all(torch.is_tensor(v) for v in ck["state_dict"].values())
        predictor = member_named("gbm").load(ck)
        assert predictor.model.layout == layout and predictor.model.trees.n_trees > 0
        summary = json.loads((trained["assets"] / f"model6asr_{fold}.json").read_text())
        assert summary["n_features"] == len(layout.names) and summary["config"]["model"]["gbm_features"] == \
            "alignment+asr"
        # model6asr's new-word trees: on the vocabulary-free columns, weights-only, worth a held-out log loss
        assert ck["new_word_feature_names"] == [n for n in layout.names if n in layout.without_vocabulary().names]
        assert all(torch.is_tensor(v) for v in ck["new_word_state_dict"].values())
        assert predictor.model.new_word is not None and predictor.model.new_word.trees.n_trees > 0
        assert summary["valid_logloss_new_word_trees"] > 0
    bad = dict(ck, feature_names=ck["feature_names"][:-3] + ["asr_whisper-tiny.en_made_up", *ck["feature_names"][-2:]])
    with pytest.raises(CheckpointError, match="made_up"):
        member_named("gbm").load(bad)
    with pytest.raises(CheckpointError, match="new-word trees"):
        member_named("gbm").load({k: v for k, v in ck.items() if not k.startswith("new_word")})


def test_a_fold_reads_the_cache_and_gives_the_same_trees(trained, tmp_path, decodes):
    from readaloud.pipeline.fold_run import run_fold
    run_fold("model6asr", 1, trained["data"], tmp_path, trained["tts"], overrides=OVERRIDES, quiet=True,
             progress=False)
    assert decodes == [], "the fold decoded clips the cache holds"
    mine, theirs = safe_load(tmp_path / "model6asr_1.pth"), safe_load(trained["assets"] / "model6asr_1.pth")
    assert mine["state_dict"].keys() == theirs["state_dict"].keys()
    assert all(torch.equal(mine["state_dict"][k], theirs["state_dict"][k]) for k in mine["state_dict"])


@pytest.fixture(scope="module")
def explained(trained):
    """One test row's expected text emptied, then infer.py --explain."""
    data = trained["base"] / "data_bad"
    shutil.copytree(trained["data"], data)
    meta = pd.read_csv(data / "test_metadata.csv", dtype=str, keep_default_na=False)
    bad = meta["filename"].iloc[1]
    meta.loc[1, "expected_text"] = ""
    meta.to_csv(data / "test_metadata.csv", index=False)
    out = trained["base"] / "sub.csv"
    res = run_script(trained["root"], "infer.py", "--data", data, "--assets", trained["assets"], "--tts_dir",
                     trained["tts"], "--out", out, "--no_progress", "--explain")
    return {"data": data, "bad": bad, "out": out, "stdout": res.stdout + res.stderr,
            "explain": pd.read_csv(trained["base"] / "sub_explain.csv", dtype={"filename": str}, keep_default_na=False)}


def test_infer_predicts_and_explains_every_row(explained):
    sub = pd.read_csv(explained["out"], dtype={"filename": str})
    fmt = pd.read_csv(explained["data"] / "submission_format.csv", dtype={"filename": str})
    result = json.loads(explained["out"].with_name("sub.csv.json").read_text())
    assert sub["filename"].tolist() == fmt["filename"].tolist() and sub["score"].between(0, 1).all()
    assert result["models_used"] == ["model6asr"] and list(result["fallback"]) == [explained["bad"]]
    table = explained["explain"]
    assert table["filename"].tolist() == fmt["filename"].tolist(), "one explanation per submission row, in order"
    meta = pd.read_csv(explained["data"] / "test_metadata.csv", dtype=str, keep_default_na=False).set_index("filename")
    for _, row in table[table["filename"] != explained["bad"]].iterrows():
        words = json.loads(row["word_probs"])
        assert [w["word"] for w in words] == meta.loc[row["filename"], "expected_text"].split()
        assert all(0 <= w["p"] <= 1 for w in words) and isinstance(row["transcript"], str)
        low = min(words, key=lambda w: w["logp"])
        assert row["least_likely_word"] == low["word"] and float(row["least_likely_p"]) == low["p"]
        assert row["backbone"] == BACKBONE and row["score"] == pytest.approx(
            sub.set_index("filename").loc[row["filename"], "score"])
    assert (table["transcript"] != "").any(), "Whisper heard something in some clip"
    bad = table.set_index("filename").loc[explained["bad"]]
    assert json.loads(bad["word_probs"]) == [] and "empty expected_text" in bad["note"]


def test_explain_reads_the_cache_and_writes_jsonl(explained, trained, decodes, tmp_path):
    from readaloud.pipeline.explain import explain_backbone, write_explanations
    assert explain_backbone(trained["assets"]) == BACKBONE, "the shipped member's first backbone"
    assert explain_backbone(tmp_path) == "whisper-tiny.en", "no member: tiny.en"
    done = write_explanations(explained["data"], trained["assets"], tmp_path / "e.jsonl", explained["out"],
                              device="cpu", progress=False)
    assert decodes == [], "infer.py's prediction filled the cache for the test rows"
    records = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert len(records) == done["rows"] == len(explained["explain"]) and done["explained"] == done["rows"] - 1
    good = next(r for r in records if r["words"])
    assert good["words"][good["least_likely_index"]]["word"] == good["least_likely_word"]


def test_an_explain_failure_never_costs_the_submission(trained, tmp_path, caplog):
    import infer
    args = argparse.Namespace(data=str(tmp_path / "no_such_data"), assets=str(trained["assets"]),
                              out=str(tmp_path / "s.csv"), explain="", device="cpu", no_progress=True)
    with caplog.at_level("ERROR"):
        infer.explain(args)  # logs, never raises
    assert "--explain failed" in caplog.text and not (tmp_path / "s_explain.csv").exists()


def test_asr_checkpoint_of_other_weights_is_dropped(trained, tmp_path):
    """Trees trained on another Whisper's features must not be fed this one's."""
    ck = safe_load(trained["assets"] / "model6asr_0.pth")
    atomic_save({**ck, "asr_weights": ["0000000000_" + ck["asr_weights"][0].split("_", 1)[1]]}, tmp_path / "m.pth")
    predictor = member_named("gbm").load(safe_load(tmp_path / "m.pth"))
    from readaloud.members.base import TestInputs
    meta = pd.read_csv(trained["data"] / "test_metadata.csv", dtype=str, keep_default_na=False)
    inputs = TestInputs(meta, np.ones(len(meta), bool), trained["data"], trained["tts"], progress=False)
    with pytest.raises(CheckpointError, match="retrain"):
        predictor.predict(inputs)
