"""The children benchmark end to end on a tiny fake source: espeak "children" (one voice each)
reading sentences, the shared set builder, grouped folds, one fast member, the report."""
import json

import numpy as np
import pandas as pd
import pytest

from conftest import run_script
from readaloud.audio import write_wav
from readaloud.bench import children
from readaloud.tts import EspeakTTS

SENTENCES = ("we call it bear", "tom gives up boxing", "he hates shooting", "mandy has a big arm",
             "look at the red pants", "what about the bus", "kate got the tomato", "tina loves eggplant",
             "mark lived in new york", "bob lives in cairo now")
VOICES = (("en-us+f3", 85), ("en-gb+f1", 80), ("en-us+m3", 95), ("en-029+f4", 75),
          ("en-gb-scotland+f2", 90), ("en-us+Annie", 70), ("en-gb-x-rp+m1", 92), ("en-us-nyc+f5", 78))


def fake_children(folder, clips_each: int = 8):
    """utterances.csv and one wav per utterance: child i always speaks with voice i."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, (voice, pitch) in enumerate(VOICES):
        tts = EspeakTTS(voice, pitch=pitch, rate=140 + 10 * (i % 3))
        for j in rng.choice(len(SENTENCES), clips_each, replace=False):
            utt = f"{i + 1:04d}{j:05d}"
            write_wav(folder / f"{utt}.wav", tts.synthesize(SENTENCES[j]) * 0.8, tts.sample_rate)
            rows.append({"utt": utt, "speaker": f"{i + 1:04d}", "age": 6 + i % 4, "gender": "f",
                         "text": SENTENCES[j].upper()})
    pd.DataFrame(rows).to_csv(folder / "utterances.csv", index=False)
    return folder


@pytest.mark.skipif(not children.shared_path("bench/read_aloud_set.py").exists(),
                    reason="../shared/bench/read_aloud_set.py not beside the repo")
def test_children_bench_end_to_end(tmp_path, root):
    source = fake_children(tmp_path / "source")
    out = tmp_path / "bench"
    run_script(root, "-m", "readaloud.bench.children", "--out", out, "--source", source, "--test-speakers", 2,
               "--models", "model5gbm", "--n_folds", 2, "--epochs", 1, "--jobs", 1, "--tts_dir", tmp_path / "tts",
               "--fold_seed", 5, "--train_seed", 3)
    report = json.loads((out / "children.json").read_text())
    assert json.loads((out / "data" / "cache" / "folds_2.json").read_text())["seed"] == 5, "--fold_seed reached the folds"
    assert json.loads((out / "assets" / "model5gbm_0.json").read_text())["config"]["seed"] == 3, \
        "--train_seed reached train.py"
    speakers = pd.read_csv(out / "data" / "speakers.csv", dtype=str).set_index("filename")
    train = pd.read_csv(out / "data" / "train_metadata.csv", dtype=str)
    test = pd.read_csv(out / "data" / "test_metadata.csv", dtype=str)
    train_children = set(speakers.loc[train["filename"], "speaker"])
    test_children = set(speakers.loc[test["filename"], "speaker"])
    assert len(test_children) == 2 and len(train_children) == 6 and not train_children & test_children
    assert report["children"] == {"train": sorted(train_children), "test": sorted(test_children)}
    assert report["source_children"] == sorted(f"{i + 1:04d}" for i in range(len(VOICES)))
    assert "other speakers" not in (out / "children.md").read_text(), "no --extra-train: children only"
    folds = pd.read_csv(out / "data" / "cache" / "folds_2.csv", dtype=str)
    per_child = folds.assign(child=speakers.loc[folds["filename"], "speaker"].to_numpy()).groupby("child")["fold"]
    assert set(per_child.groups) == train_children and (per_child.nunique() == 1).all(), "a child in two folds"
    assert report["fold_by"] == "groups" and report["blend"] == "logit"

    assert set(report["predictors"]) == {"prior (base rate)", "model5gbm", "ensemble"}
    grades = sorted(set(test["grade"]))
    for name, r in report["predictors"].items():
        assert set(r["change"]) == set(children.CHANGES), (name, r["change"])
        assert sorted(r["grade"]) == grades
        assert sum(c["n"] for c in r["change"].values()) == r["n"] == len(test)
        assert r["logloss"] > 0 and all(c["logloss"] > 0 for c in r["change"].values())
    assert report["predictors"]["ensemble"]["auc"] is not None
    assert report["predictors"]["prior (base rate)"]["auc"] == pytest.approx(0.5)
    assert report["predictors"]["ensemble"]["change"]["own"]["auc"] is None, "one class only: no AUC"
    assert report["fold_seconds"]["model5gbm"]["folds"] == 2 and report["fold_seconds"]["model5gbm"]["seconds"] > 0
    assert {"preprocess", "train", "inference model5gbm", "inference ensemble"} <= set(report["step_seconds"])
    assert all(v > 0 for v in report["step_seconds"].values())
    md = (out / "children.md").read_text()
    assert "| ensemble |" in md and "| model5gbm |" in md and "swap" in md and "grade " in md
    parts = report["decomposition"]
    assert set(parts) == {"model5gbm", "ensemble"}
    assert parts["ensemble"]["logloss"] == pytest.approx(report["predictors"]["ensemble"]["logloss"])
    assert "| miscalibration | discrimination | uncertainty | recalibrated |" in md
    for png in ("reliability.png", "changes.png"):
        assert (out / png).stat().st_size > 1000
    oof = report["oof_children"]
    assert set(oof) == {"model5gbm", "ensemble"} and set(oof["ensemble"]["children"]) == train_children
    assert set(report["test_children"]["ensemble"]["children"]) == test_children
    oof_rows = pd.read_csv(out / "assets" / "model5gbm_0_oof.csv", dtype={"filename": str})
    assert oof["model5gbm"]["worst_child_logloss"] == max(oof["model5gbm"]["children"].values())
    assert "Out of fold, on the training children" in md and "children above the prior" in md
    assert len(oof_rows) > 0

    # --retrain: the same data folder, the member trained again with an option, the run's own folds untouched
    before = (out / "assets" / "model5gbm_0.pth").read_bytes()
    other = tmp_path / "other"
    run_script(root, "-m", "readaloud.bench.children", "--retrain", out, "--out", other, "--models", "model5gbm",
               "--n_folds", 2, "--jobs", 1, "--fold_seed", 5, "--gbm_max_leaf_nodes", 3)
    again = json.loads((other / "children.json").read_text())
    assert again["retrained_from"] == str(out.resolve()) and not (other / "data").exists(), "no set rebuilt"
    assert again["data"] == str((out / "data").resolve())
    assert json.loads((other / "assets" / "model5gbm_0.json").read_text())["config"]["model"]["gbm_max_leaf_nodes"] == 3
    assert json.loads((out / "assets" / "model5gbm_0.json").read_text())["config"]["model"]["gbm_max_leaf_nodes"] != 3
    assert (out / "assets" / "model5gbm_0.pth").read_bytes() == before, "the run's own fold was left as it was"
    assert again["children"] == report["children"] and "| model5gbm |" in (other / "children.md").read_text()
    assert again["source_children"] == report["source_children"], "the children of the run's own source"


def test_retrain_keeps_the_other_members_folds(tmp_path):
    """--retrain links every fold of the run's other members (checkpoint, OOF, summary, run folder) and the
    ears, so train.py skips them; the retrained member's folds stay behind, to be trained again."""
    run = tmp_path / "run" / "assets"
    (run / "ears" / "ear1").mkdir(parents=True)
    (run / "ears" / "ear1" / "model.bin").write_bytes(b"ear")
    (run / "ears" / "ear1" / "ear.json").write_text("{}")
    for variant in ("model6asr", "model8decoder"):
        for fold in range(2):
            stem = f"{variant}_{fold}"
            (run / f"{stem}.json").write_text(json.dumps({"variant": variant, "fold": fold}))
            (run / f"{stem}.pth").write_bytes(stem.encode())
            (run / f"{stem}_oof.csv").write_text("filename,logit\n")
            (run / "runs" / stem).mkdir(parents=True)
            (run / "runs" / stem / "config.json").write_text("{}")
    out = tmp_path / "other" / "assets"
    with pytest.raises(SystemExit, match="never finished"):
        children.keep_members(run, out, {"model6asr"})
    (run / "model_configs.json").write_text(json.dumps({"members": [{"model": "model6asr", "weight": 1.0},
                                                                    {"model": "model8decoder", "weight": 0.5}]}))
    assert children.keep_members(run, out, {"model6asr"}) == ["model8decoder"]
    for fold in range(2):
        stem = f"model8decoder_{fold}"
        assert (out / f"{stem}.pth").read_bytes() == stem.encode()
        assert (out / f"{stem}.json").is_file() and (out / f"{stem}_oof.csv").is_file()
        assert (out / "runs" / stem / "config.json").is_file()
        assert not (out / f"model6asr_{fold}.pth").exists() and not (out / "runs" / f"model6asr_{fold}").exists()
    assert (out / "ears" / "ear1" / "model.bin").read_bytes() == b"ear"
    assert not list(out.rglob("*.tmp*")), "every file renamed into place"
    assert children.keep_members(run, out, {"model6asr"}) == ["model8decoder"], "a second call finds them there"
    assert children.keep_members(run, tmp_path / "new", {"model6asr", "model8decoder", "model9contrast"}) == []
    assert not list((tmp_path / "new").glob("*.pth")), "every member retrained: nothing kept"


def test_per_child_figures():
    """Median and worst child, children above the base rate on their own clips, correct readings."""
    y = np.array([1, 0, 1, 0, 1, 1])
    p = np.array([0.9, 0.1, 0.1, 0.9, 0.6, 0.6])
    child = np.array(["a", "a", "b", "b", "c", "c"])
    f = children.per_child(y, p, child, prior=0.5, correct=y == 1)
    assert f["children"]["a"] == pytest.approx(-np.log(0.9)) and f["worst_child"] == "b"
    assert f["worst_child_logloss"] == pytest.approx(-np.log(0.1))
    assert f["children_above_prior"] == ["b"], "b is worse than 0.5 on its clips; a and c are better"
    assert f["median_child"] == pytest.approx(-np.log(0.6))
    assert f["correct_logloss"] == pytest.approx(np.mean(-np.log([0.9, 0.1, 0.6, 0.6])))


def test_children_bench_refuses_an_out_folder_inside_the_repo(root):
    with pytest.raises(SystemExit, match="inside the repository"):
        children.main(["--out", str(root / "bench_out" / "children")])


def test_oof_children_reports_only_the_source_children(tmp_path, monkeypatch):
    """Speakers added to the training half (--extra-train adults) train the models and fit the blend,
    but the per-child figures and the prior are the source children's alone."""
    from readaloud.pipeline import ensemble
    rows = pd.DataFrame({"filename": [f"f{i}.wav" for i in range(8)], "fold": [0, 0, 1, 1, 0, 1, 0, 1],
                         "task": "sentence_repetition", "grade": "1", "score": [1, 0, 1, 0, 1, 1, 1, 1],
                         "logit": [2.0, -2.0, 1.0, -1.0, 3.0, 3.0, -3.0, -3.0]})
    speakers = pd.DataFrame({"filename": rows["filename"], "speaker": ["a", "a", "b", "b", "z", "z", "z", "z"],
                             "change": ["own", "swap", "own", "drop", "own", "own", "own", "own"]})
    (tmp_path / "data").mkdir()
    speakers.to_csv(tmp_path / "data" / "speakers.csv", index=False)
    monkeypatch.setattr(ensemble, "collect_oof", lambda assets: {"m": rows})
    monkeypatch.setattr(ensemble, "read_config", lambda assets: {"members": [{"model": "m", "weight": 1.0}],
                                                                  "bias": 0.0})
    (tmp_path / "source").mkdir()
    pd.DataFrame({"utt": ["1", "2"], "speaker": ["a", "b"], "age": [7, 8], "gender": "f", "text": "X"}).to_csv(
        tmp_path / "source" / "utterances.csv", index=False)
    kids = children.source_children(tmp_path / "source")
    assert kids == {"a", "b"}
    figures = children.oof_children(tmp_path / "data", tmp_path / "assets", kids)
    assert set(figures["m"]["children"]) == {"a", "b"} and figures["m"]["n_children"] == 2
    p = 1 / (1 + np.exp(-np.array([2.0, -2.0, 1.0, -1.0])))
    y = np.array([1, 0, 1, 0])
    assert figures["m"]["logloss"] == pytest.approx(np.mean(-np.log(np.where(y == 1, p, 1 - p))))
    everyone = children.oof_children(tmp_path / "data", tmp_path / "assets")
    assert set(everyone["m"]["children"]) == {"a", "b", "z"}, "without a source, every training speaker"
    with pytest.raises(ValueError, match="no OOF clip"):
        children.oof_children(tmp_path / "data", tmp_path / "assets", {"nobody"})
