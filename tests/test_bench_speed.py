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
