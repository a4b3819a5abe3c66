"""Leave-one-speaker-out: one data set and one quality run per held-out speaker, each speaker's
test items come only from that speaker, and the table holds every predictor's mean."""
import json
import textwrap
from pathlib import Path

import pytest

from readaloud.bench import loso, quality

BUILDER = textwrap.dedent("""
    import argparse, json, pathlib
    p = argparse.ArgumentParser()
    p.add_argument("--recordings", nargs="+"); p.add_argument("--train-speakers"); p.add_argument("--test-speakers")
    p.add_argument("--n-train", type=int); p.add_argument("--n-test", type=int); p.add_argument("--seed", type=int)
    p.add_argument("--out")
    a = p.parse_args()
    out = pathlib.Path(a.out); out.mkdir(parents=True, exist_ok=True)
    (out / "test_labels.csv").write_text("filename,score\\n")
    (out / "split.json").write_text(json.dumps({"train": a.train_speakers.split(","),
                                                "test": a.test_speakers.split(","), "n": [a.n_train, a.n_test]}))
""")


def test_loso_runs_each_speaker_once_and_tabulates(tmp_path, monkeypatch):
    builder = tmp_path / "builder.py"
    builder.write_text(BUILDER)
    calls = []

    def fake_quality(argv):
        data = argv[argv.index("--data") + 1]
        split = json.loads((Path(data) / "split.json").read_text())
        calls.append((split, argv))
        held = split["test"][0]
        member = {"a": 0.5, "b": 0.6, "c": 0.4}[held]
        return {"test_logloss": {"prior (base rate)": {"overall": 0.69}, "model1mean": {"overall": member},
                                 "ensemble": {"overall": member - 0.05}},
                "decomposition": {"model1mean": {"recalibrated": member - 0.2},
                                  "ensemble": {"recalibrated": member - 0.25}}}

    monkeypatch.setattr(quality, "main", fake_quality)
    out = tmp_path / "loso"
    res = loso.main(["--recordings", str(tmp_path), "--speakers", "a,b,c", "--out", str(out), "--builder",
                     str(builder), "--n-train", "30", "--n-test", "10", "--models", "model1mean", "--epochs", "1"])
    assert len(calls) == 3
    for split, argv in calls:
        assert len(split["test"]) == 1 and split["test"][0] not in split["train"] and len(split["train"]) == 2
        assert split["n"] == [30, 10]
        assert argv[-4:] == ["--models", "model1mean", "--epochs", "1"]  # unknown options pass through
    table = res["table"]
    assert table["model1mean"]["mean"] == pytest.approx(0.5)
    assert table["ensemble"]["mean"] == pytest.approx(0.45)
    assert table["ensemble"]["b"] == pytest.approx(0.55)
    floor = res["recalibrated"]
    assert floor["model1mean"]["mean"] == pytest.approx(0.3) and floor["ensemble"]["c"] == pytest.approx(0.15)
    md = (out / "loso.md").read_text()
    assert "| ensemble |" in md and "mean" in md
    floor_rows = md.split("| recalibrated |")[1]
    assert "| ensemble | 0.2500 | 0.3500 | 0.1500 | 0.2500 |" in floor_rows
    assert (out / "loso.png").stat().st_size > 1000
    # a rerun does not rebuild finished data sets
    before = (out / "heldout_a" / "data" / "split.json").stat().st_mtime_ns
    loso.main(["--recordings", str(tmp_path), "--speakers", "a,b,c", "--out", str(out), "--builder", str(builder)])
    assert (out / "heldout_a" / "data" / "split.json").stat().st_mtime_ns == before


def test_loso_refuses_a_single_speaker(tmp_path):
    (tmp_path / "b.py").write_text("")
    with pytest.raises(SystemExit, match="at least two"):
        loso.main(["--recordings", str(tmp_path), "--speakers", "a", "--builder", str(tmp_path / "b.py")])


def test_loso_floor_only_for_predictors_every_speaker_decomposes():
    a = {"decomposition": {"ensemble": {"recalibrated": 0.1}, "model1mean": {"recalibrated": 0.2}}}
    b = {"decomposition": {"ensemble": {"recalibrated": 0.3}}}
    old = {"test_logloss": {}}   # a summary written before the decomposition
    assert loso.recalibrated_table({"a": a, "b": b}) == {"ensemble": {"a": 0.1, "b": 0.3, "mean": pytest.approx(0.2)}}
    assert loso.recalibrated_table({"a": a, "c": old}) == {}
