"""The speed benchmark runs end to end on a tiny set and reports what it measured."""
import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, root):
    base = tmp_path_factory.mktemp("speed")
    subprocess.run([sys.executable, "make_demo_data.py", "--out", str(base / "data"), "--n-train", "60",
                    "--n-test", "6", "--seed", "3"], cwd=root, check=True, capture_output=True)
    return base


def test_speed_benchmark_measures_both_paths_and_both_job_counts(tiny, root):
    out = tiny / "bench" / "speed.md"
    run = subprocess.run([sys.executable, "-m", "readaloud.bench.speed", "--from_scratch", "--data", str(tiny / "data"),
                          "--tts_dir", str(tiny / "tts"), "--n", "8", "--repeats", "1", "--models", "2",
                          "--jobs_models", "model1mean,model5gbm", "--jobs_folds", "0", "--jobs_epochs", "1",
                          "--thread_scaling", "small", "--scaling_n", "8",
                          "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    for key in ("straightforward/train", "project/train", "straightforward/infer", "project/infer"):
        assert result["rows"][key]["clips_per_s"] > 0 and result["rows"][key]["peak_rss_mb"] > 0
    jobs = result["jobs"]
    folds = {"model1mean_0", "model5gbm_0"}
    assert set(jobs["fold_seconds"]["1"]) == folds and set(jobs["fold_seconds"]["2"]) == folds
    assert jobs["jobs1_s"] > 0 and jobs["speedup"] == pytest.approx(jobs["jobs1_s"] / jobs["jobs2_s"])
    assert jobs["bound"] == pytest.approx(2 * sum(jobs["fold_seconds"]["1"].values())
                                          / sum(jobs["fold_seconds"]["2"].values()))
    assert set(jobs["per_model"]) == {"model1mean", "model5gbm"}
    small = result["thread_scaling"]["small"]
    assert small["threads1_clips_per_s"] > 0 and small["speedup"] == pytest.approx(
        small["threads2_clips_per_s"] / small["threads1_clips_per_s"])
    assert small["two_at_once_clips_per_s"] > 0 and small["jobs_gain"] == pytest.approx(
        small["two_at_once_clips_per_s"] / small["threads2_clips_per_s"])
    text = out.read_text()
    assert "| small (d_model 128, 3 layers) |" in text
    assert "project / straightforward" in text and "`train.py --jobs 1` vs `--jobs 2`" in text
    assert (tiny / "bench" / "jobs2_assets" / "model5gbm_0.pth").exists(), "job assets beside the report"


def test_speed_benchmark_reports_each_default_member_cold_and_warm(tiny, root, monkeypatch):
    """The default report (one member here, model8decoder, to stay small): training and inference items/s
    cold and warm, the ensemble's row, the per-clip work at both windows; the data folder gets no cache."""
    from readaloud.bench import speed
    monkeypatch.setenv("READALOUD_BACKBONES", str(tiny / "backbones"))
    before = sorted(p.name for p in (tiny / "data").iterdir())
    out = tiny / "ens" / "speed.md"
    report = speed.main(["--data", str(tiny / "data"), "--models", "model8decoder", "--n", "2", "--out", str(out)])
    r = report["members"]["model8decoder"]
    assert r["train_clips"] == 60 and r["test_clips"] == 6 and r["fold_s"] > 0 and r["caches_s"] > 0
    assert r["infer_cold_s"] > 0 and r["infer_warm_s"] > 0
    e = report["ensemble"]
    assert e["train_cold_s"] == r["caches_s"] + r["fold_s"] and e["train_warm_s"] == r["fold_s"]
    assert list(report["member_speed"]["members"]["model8decoder"]) == ["frozen encoder (whisper-tiny.en)"]
    text = out.read_text()
    assert f"| model8decoder | 60 | {60 / (r['caches_s'] + r['fold_s']):.2f} | {60 / r['fold_s']:.2f} |" in text
    assert "| **ensemble** |" in text and "30 s window" in text and out.with_suffix(".json").exists()
    assert sorted(p.name for p in (tiny / "data").iterdir()) == before, "no cache written into the data folder"
