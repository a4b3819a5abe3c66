"""The trainer: a killed fold resumes to the same weights, early stopping, metrics and plots."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

TINY = ["--d_model", "32", "--encoder_layers", "1", "--encoder_heads", "2", "--ffn_dim", "64",
        "--threads", "1", "--batch_max_frames", "3000", "--match_dim", "16"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, root):
    base = tmp_path_factory.mktemp("train")
    data = base / "data"
    subprocess.run([sys.executable, "make_demo_data.py", "--out", str(data), "--n-train", "60",
                    "--n-test", "6", "--seed", "5"], cwd=root, check=True, capture_output=True)
    return data


def train(root, data, assets, *extra, env=None):
    cmd = [sys.executable, "train_model1mean.py", "--fold", "0", "--n_folds", "3", "--data", str(data),
           "--assets", str(assets), "--tts_dir", str(data.parent / "tts"), "--no_progress", *TINY, *extra]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_killed_fold_resumes_to_the_same_weights(tiny_data, root, tmp_path):
    straight = train(root, tiny_data, tmp_path / "a", "--epochs", "3")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = train(root, tiny_data, tmp_path / "b", "--epochs", "3",
                   env={"READALOUD_FAULT_DIE_AFTER_EPOCH": "2"})
    assert killed.returncode == 137
    assert not (tmp_path / "b" / "model1mean_0.pth").exists(), "a killed fold is not finished"
    resumed = train(root, tiny_data, tmp_path / "b", "--epochs", "3")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and "at epoch 2" in resumed.stderr
    a, b = weights(tmp_path / "a" / "model1mean_0.pth"), weights(tmp_path / "b" / "model1mean_0.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = pd.read_csv(tmp_path / "b" / "runs" / "model1mean_0" / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2, 3], "metrics survive the kill without duplicates"
    again = train(root, tiny_data, tmp_path / "b", "--epochs", "3")
    assert "already trained" in again.stdout


def test_early_stopping_metrics_and_plots(tiny_data, root, tmp_path):
    # lr so small that nothing improves after the first evaluation: patience 1 stops at epoch 2
    run = train(root, tiny_data, tmp_path, "--epochs", "6", "--patience", "1", "--lr", "1e-9",
                "--warmup_ratio", "0")
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = pd.read_csv(tmp_path / "runs" / "model1mean_0" / "metrics.csv")
    assert len(metrics) < 6 and "early stop" in run.stderr
    assert {"train_loss", "valid_logloss", "lr", "grad_norm", "seconds"} <= set(metrics.columns)
    assert (tmp_path / "runs" / "model1mean_0" / "curves.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "model1mean_0.json").read_text())
    assert summary["config"]["optim"]["lr"] == 1e-9, "overrides reach the saved config"
    assert summary["config"]["model"]["d_model"] == 32
    assert "git_commit" in summary["environment"] and "torch" in summary["environment"]


def test_bad_override_fails_clearly(tiny_data, root, tmp_path):
    run = train(root, tiny_data, tmp_path, "--epochs", "1", "--lrr", "3")
    assert run.returncode != 0 and "unknown option --lrr; did you mean --lr" in run.stderr
