"""The quality benchmark runs the pipeline on a labelled folder and writes its report and plots."""
import json

import pandas as pd
import pytest

from conftest import run_script


def test_quality_benchmark_reports_per_task_and_grade(chain, tmp_path):
    import shutil
    out, assets = tmp_path / "quality", tmp_path / "assets"
    shutil.copytree(chain["assets"], assets)  # trained folds are reused: the benchmark only scores them
    res = run_script(chain["root"], "-m", "readaloud.bench.quality", "--data", chain["data"], "--out", out,
                     "--assets", assets, "--tts_dir", chain["tts"], "--models", "model1mean", "--n_folds", 2,
                     "--epochs", 1, "--jobs", 2)
    assert "finished already, skipped" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    table = summary["test_logloss"]
    assert {"prior (base rate)", "prior (per task)", "model1mean", "ensemble"} <= set(table)
    test = pd.read_csv(chain["data"] / "test_metadata.csv", dtype=str)
    for row in table.values():
        assert {f"task={t}" for t in test["task"]} | {f"grade={g}" for g in test["grade"]} <= set(row)
        assert all(v > 0 for v in row.values())
    for png in ("reliability.png", "per_task.png", "cv_logloss.png"):
        assert (out / png).stat().st_size > 1000
    md = (out / "summary.md").read_text()
    assert "| ensemble |" in md and "reliability.png" in md
    parts = summary["decomposition"]
    assert set(parts) == {"model1mean", "ensemble"}   # the priors are not decomposed
    for name, d in parts.items():
        assert d["logloss"] == pytest.approx(table[name]["overall"])
        assert d["miscalibration"] - d["discrimination"] + d["uncertainty"] == pytest.approx(d["logloss"])
        assert d["recalibrated"] <= d["logloss"] + 1e-12
    assert "| log loss | miscalibration | discrimination | uncertainty | recalibrated |" in md
