"""The trainer: a killed fold resumes to the same weights, early stopping, metrics and plots."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

# the trainer's mechanics on a tiny small encoder (--backbone scratch: model1mean reads tiny.en by default)
TINY = ["--backbone", "scratch", "--d_model", "32", "--encoder_layers", "1", "--encoder_heads", "2", "--ffn_dim", "64",
        "--threads", "1", "--batch_max_frames", "3000", "--match_dim", "16"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, root):
    base = tmp_path_factory.mktemp("train")
    data = base / "data"
    subprocess.run([sys.executable, "make_demo_data.py", "--out", str(data), "--n-train", "60",
                    "--n-test", "6", "--seed", "5"], cwd=root, check=True, capture_output=True)
    return data


def train(root, data, assets, *extra, env=None, fault=None):
    """train_model1mean.py on fold 0 of 3; `fault` = (kind, n) runs it through tests/fault_injection.py."""
    inject = ["tests/fault_injection.py", fault[0], str(fault[1])] if fault else []
    cmd = [sys.executable, *inject, "train_model1mean.py", "--fold", "0", "--n_folds", "3", "--data", str(data),
           "--assets", str(assets), "--tts_dir", str(data.parent / "tts"), "--no_progress", *TINY, *extra]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_killed_fold_resumes_to_the_same_weights(tiny_data, root, tmp_path):
    straight = train(root, tiny_data, tmp_path / "a", "--epochs", "3")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = train(root, tiny_data, tmp_path / "b", "--epochs", "3", fault=("die_after_eval", 2))
    assert killed.returncode == 137
    assert not (tmp_path / "b" / "model1mean_0.pth").exists(), "a killed fold is not finished"
    resumed = train(root, tiny_data, tmp_path / "b", "--epochs", "3")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and "at epoch 2" in resumed.stderr
    a, b = weights(tmp_path / "a" / "model1mean_0.pth"), weights(tmp_path / "b" / "model1mean_0.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = pd.read_csv(tmp_path / "b" / "runs" / "model1mean_0" / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2, 3], "metrics survive the kill without duplicates"
    assert list((tmp_path / "b" / "runs" / "model1mean_0" / "tensorboard").glob("events.*"))
    for run in ("a", "b"):   # finished: the resume state went, the record of the run stayed
        run_dir = tmp_path / run / "runs" / "model1mean_0"
        assert not (run_dir / "last.pth").exists() and not (run_dir / "best.pth").exists(), run
        assert (run_dir / "metrics.csv").exists() and (run_dir / "curves.png").exists(), run
    assert "removed its resume state" in resumed.stderr
    again = train(root, tiny_data, tmp_path / "b", "--epochs", "3")
    assert "already trained" in again.stdout


def test_killed_mid_epoch_resumes_to_the_same_weights(tiny_data, root, tmp_path):
    flags = ("--epochs", "2", "--eval_every", "2", "--batch_max_frames", "1500")
    straight = train(root, tiny_data, tmp_path / "a", *flags)
    assert straight.returncode == 0, straight.stderr[-2000:]
    metrics = pd.read_csv(tmp_path / "a" / "runs" / "model1mean_0" / "metrics.csv")
    assert len(metrics) > 2, "evaluations every 2 updates, not only at epoch ends"
    killed = train(root, tiny_data, tmp_path / "b", *flags, fault=("die_after_eval", 3))
    assert killed.returncode == 137
    resumed = train(root, tiny_data, tmp_path / "b", *flags)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr
    a, b = weights(tmp_path / "a" / "model1mean_0.pth"), weights(tmp_path / "b" / "model1mean_0.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_plateau_metrics_tracking_and_plots(tiny_data, root, tmp_path):
    # lr so small that nothing improves after the first evaluation: the plateau schedule halves
    # the learning rate after each bad evaluation and patience 2 stops at the third
    run = train(root, tiny_data, tmp_path, "--epochs", "6", "--patience", "2", "--lr", "1e-9",
                "--warmup_ratio", "0", "--schedule", "plateau", "--plateau_patience", "1")
    assert run.returncode == 0, run.stderr[-2000:]
    run_dir = tmp_path / "runs" / "model1mean_0"
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert len(metrics) < 6 and "early stop" in run.stderr
    best, expected_lr = float("inf"), 1e-9
    for loss, lr in zip(metrics["valid_logloss"], metrics["lr"]):  # halved after every bad evaluation
        assert lr == pytest.approx(expected_lr)
        if loss < best - 1e-5:
            best = loss
        else:
            expected_lr *= 0.5
    assert expected_lr < 1e-9, "the plateau schedule reduced the learning rate"
    assert {"train_loss", "valid_logloss", "lr", "grad_norm", "seconds"} <= set(metrics.columns)
    assert (run_dir / "curves.png").stat().st_size > 1000 and (run_dir / "confusion.png").stat().st_size > 1000
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*")), "TensorBoard logs"
    summary = json.loads((tmp_path / "model1mean_0.json").read_text())
    assert summary["config"]["optim"]["lr"] == 1e-9 and summary["config"]["optim"]["schedule"] == "plateau"
    assert "git_commit" in summary["environment"] and "torch" in summary["environment"]
    # the overrides reached the model itself, not only the saved config
    assert weights(tmp_path / "model1mean_0.pth")["encoder.conv1.weight"].shape[0] == 32


def test_select_last_keeps_the_last_epoch_and_the_held_out_labels_choose_nothing(tiny_data, root, tmp_path):
    import shutil
    common = ("--epochs", "3", "--select", "last", "--patience", "1")
    plain = train(root, tiny_data, tmp_path / "a", *common)
    assert plain.returncode == 0, plain.stderr[-2000:]
    summary = json.loads((tmp_path / "a" / "model1mean_0.json").read_text())
    assert summary["select"] == "last" and summary["epochs_run"] == 3 and summary["best_epoch"] == 3
    assert "early stop" not in plain.stderr and "*best*" not in plain.stderr
    # the same data with every held-out label of fold 0 flipped; the fold file and caches copied, so
    # only those labels differ. A killed and resumed run on it keeps bit for bit the same weights.
    flipped = tmp_path / "flipped" / "data"
    shutil.copytree(tiny_data, flipped)
    held = set(pd.read_csv(tmp_path / "a" / "model1mean_0_oof.csv")["filename"])
    labels = pd.read_csv(flipped / "train_labels.csv")
    assert held and held < set(labels["filename"])
    rows = labels["filename"].isin(held)
    labels.loc[rows, "score"] = 1 - labels.loc[rows, "score"]
    labels.to_csv(flipped / "train_labels.csv", index=False)
    killed = train(root, flipped, tmp_path / "b", *common, fault=("die_after_eval", 2))
    assert killed.returncode == 137
    resumed = train(root, flipped, tmp_path / "b", *common)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = weights(tmp_path / "a" / "model1mean_0.pth"), weights(tmp_path / "b" / "model1mean_0.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    va = pd.read_csv(tmp_path / "a" / "runs" / "model1mean_0" / "metrics.csv")["valid_logloss"]
    vb = pd.read_csv(tmp_path / "b" / "runs" / "model1mean_0" / "metrics.csv")["valid_logloss"]
    assert (va != vb).all(), "the held-out clips were scored against their own (flipped) labels"
    # control: with select=best (the default) the held-out fold stops the same run early
    best = train(root, tiny_data, tmp_path / "c", "--epochs", "3", "--patience", "1", "--lr", "1e-9",
                 "--warmup_ratio", "0", "--schedule", "constant")
    assert best.returncode == 0 and "early stop" in best.stderr
    last = train(root, tiny_data, tmp_path / "d", "--epochs", "3", "--patience", "1", "--lr", "1e-9",
                 "--warmup_ratio", "0", "--schedule", "constant", "--select", "last")
    assert last.returncode == 0 and "early stop" not in last.stderr
    assert json.loads((tmp_path / "d" / "model1mean_0.json").read_text())["epochs_run"] == 3


def test_stop_epoch_stops_on_the_full_schedule_s_path(tiny_data, root, tmp_path):
    # stopping after epoch 2 of a 3-epoch schedule keeps exactly the weights a full run has after its
    # second epoch (its resume state when killed there), at the same learning rates
    stopped = train(root, tiny_data, tmp_path / "a", "--epochs", "3", "--stop_epoch", "2", "--select", "last")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert "stopped after epoch 2 of the 3-epoch schedule" in stopped.stderr
    full = train(root, tiny_data, tmp_path / "b", "--epochs", "3", "--select", "last", fault=("die_after_eval", 2))
    assert full.returncode == 137
    a = weights(tmp_path / "a" / "model1mean_0.pth")
    b = torch.load(tmp_path / "b" / "runs" / "model1mean_0" / "last.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lr_a = pd.read_csv(tmp_path / "a" / "runs" / "model1mean_0" / "metrics.csv")["lr"].tolist()
    lr_b = pd.read_csv(tmp_path / "b" / "runs" / "model1mean_0" / "metrics.csv")["lr"].tolist()
    assert len(lr_a) == 2 and lr_a == lr_b[:2]
    summary = json.loads((tmp_path / "a" / "model1mean_0.json").read_text())
    assert summary["epochs_run"] == 2 and summary["best_epoch"] == 2
    # a stop beyond the schedule (a variant's stop under a shorter --epochs) runs the whole schedule
    short = train(root, tiny_data, tmp_path / "c", "--epochs", "1", "--stop_epoch", "2", "--select", "last")
    assert short.returncode == 0 and "stopped after" not in short.stderr
    assert json.loads((tmp_path / "c" / "model1mean_0.json").read_text())["epochs_run"] == 1
    bad = train(root, tiny_data, tmp_path / "d", "--epochs", "3", "--stop_epoch", "-1")
    assert bad.returncode != 0 and "--stop_epoch must be 0" in bad.stderr


def test_average_last_keeps_the_mean_of_the_last_epochs_and_resumes_to_it(tiny_data, root, tmp_path):
    averaged = train(root, tiny_data, tmp_path / "avg", "--epochs", "3", "--select", "last", "--average_last", "2")
    assert averaged.returncode == 0, averaged.stderr[-2000:]
    assert "kept the mean of the weights of the last 2 epochs" in averaged.stderr
    full = train(root, tiny_data, tmp_path / "full", "--epochs", "3", "--select", "last")
    assert full.returncode == 0, full.stderr[-2000:]
    cut = train(root, tiny_data, tmp_path / "cut", "--epochs", "3", "--select", "last", fault=("die_after_eval", 2))
    assert cut.returncode == 137
    w2 = torch.load(tmp_path / "cut" / "runs" / "model1mean_0" / "last.pth", weights_only=True)["model"]
    w3, mean = weights(tmp_path / "full" / "model1mean_0.pth"), weights(tmp_path / "avg" / "model1mean_0.pth")
    floats = [k for k in w3 if w3[k].is_floating_point()]
    assert any(not torch.equal(w2[k], w3[k]) for k in floats), "the two epochs' weights differ"
    for k in floats:
        assert torch.allclose(mean[k], (w2[k] + w3[k]) / 2, atol=1e-6), k
    # killed after the first averaged epoch and resumed: the same mean, bit for bit
    killed = train(root, tiny_data, tmp_path / "b", "--epochs", "3", "--select", "last", "--average_last", "2",
                   fault=("die_after_eval", 2))
    assert killed.returncode == 137
    resumed = train(root, tiny_data, tmp_path / "b", "--epochs", "3", "--select", "last", "--average_last", "2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = weights(tmp_path / "b" / "model1mean_0.pth")
    assert all(torch.equal(again[k], mean[k]) for k in mean)
    assert json.loads((tmp_path / "avg" / "model1mean_0.json").read_text())["averaged_epochs"] == 2
    refused = train(root, tiny_data, tmp_path / "c", "--epochs", "3", "--average_last", "2")
    assert refused.returncode != 0 and "goes with --select last" in refused.stderr


def test_select_last_refuses_a_schedule_driven_by_the_held_out_fold(tiny_data, root, tmp_path):
    run = train(root, tiny_data, tmp_path, "--epochs", "1", "--select", "last", "--schedule", "plateau")
    assert run.returncode != 0 and "--select last" in run.stderr and "plateau" in run.stderr
    run = train(root, tiny_data, tmp_path, "--epochs", "1", "--select", "first")
    assert run.returncode != 0 and "'first' is not one of" in run.stderr


def test_max_updates_stops_training(tiny_data, root, tmp_path):
    run = train(root, tiny_data, tmp_path, "--epochs", "5", "--max_updates", "3")
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "model1mean_0.json").read_text())
    assert summary["updates"] == 3 and "max_updates" in summary["stopped"]


def test_schedules_warm_up_then_decay():
    from types import SimpleNamespace
    from readaloud.pipeline.trainer import lr_factor
    for schedule in ("cosine", "inverse_sqrt", "plateau", "constant"):
        cfg = SimpleNamespace(warmup_ratio=0.1, schedule=schedule, min_lr_ratio=0.02)
        f = [lr_factor(s, 100, cfg) for s in range(100)]
        assert f[0] < f[5] < f[9] == pytest.approx(1.0), schedule
        if schedule in ("cosine", "inverse_sqrt"):
            assert f[99] < 0.4 and all(a >= b for a, b in zip(f[10:], f[11:]))
        else:
            assert f[99] == 1.0


def test_bad_override_fails_clearly(tiny_data, root, tmp_path):
    run = train(root, tiny_data, tmp_path, "--epochs", "1", "--lrr", "3")
    assert run.returncode != 0 and "unknown option --lrr; did you mean --lr" in run.stderr


def test_wandb_offline_without_an_account(tiny_data, root, tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": "", "WANDB_SILENT": "true"}
    run = train(root, tiny_data, tmp_path, "--epochs", "1", "--wandb", env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert list((tmp_path / "runs" / "model1mean_0" / "wandb").glob("offline-run-*")), "offline W&B run written"


def test_non_finite_losses_never_update_and_abort_the_fold(tiny_data, root, tmp_path):
    from readaloud.pipeline.checking import check, retrain_commands
    # a clean first epoch, then every loss is NaN: no update may happen, the fold aborts
    run = train(root, tiny_data, tmp_path, "--epochs", "3", fault=("nan_from_step", 4))
    assert run.returncode == 3 and "non-finite losses in a row" in run.stderr
    run_dir = tmp_path / "runs" / "model1mean_0"
    last = torch.load(run_dir / "last.pth", weights_only=True)
    assert last["state"]["epoch"] >= 1 and all(torch.isfinite(v).all() for v in last["model"].values()
                                                 if v.is_floating_point())
    assert not (tmp_path / "model1mean_0.pth").exists()
    _, todo = check(tmp_path, ["model1mean"], 3)
    reason = {(r.model, r.fold): r for r in todo}[("model1mean", 0)]
    assert str(reason).startswith("aborted: non-finite loss")
    assert reason.kind == "aborted" and reason.seed == 0, "a record: what happened and with which seed"
    cmd = retrain_commands([reason], 3, tiny_data, tmp_path)[0]
    assert "--restart --seed 1" in cmd and "--fold 0" in cmd


def test_a_corrupt_training_clip_is_listed_and_skipped(tiny_data, root, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("cache"))
    meta = pd.read_csv(data / "train_metadata.csv")
    bad = meta["filename"][0]
    (data / bad).write_bytes(b"RIFF\x00\x00\x00\x00WAVEbroken")
    run = train(root, data, tmp_path / "assets", "--epochs", "1")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "unusable" in run.stderr and bad in (data / "cache" / "bad_clips.csv").read_text()
    folds = pd.read_csv(data / "cache" / "folds_3.csv").set_index("filename")["fold"]
    summary = json.loads((tmp_path / "assets" / "model1mean_0.json").read_text())
    assert summary["skipped_clips"] == [bad]
    if folds[bad] == 0:  # in the validation fold it still gets a (flagged) prediction
        oof = pd.read_csv(tmp_path / "assets" / "model1mean_0_oof.csv").set_index("filename")
        assert oof.loc[bad, "fallback"] == 1


def test_the_same_command_gives_the_same_numbers(tiny_data, root, tmp_path):
    """Nothing in a fold depends on timing (its thread count is fixed for the whole run): the
    same command twice gives the same weights and the same out-of-fold predictions."""
    first = train(root, tiny_data, tmp_path / "a", "--epochs", "1")
    second = train(root, tiny_data, tmp_path / "b", "--epochs", "1")
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-2000:]
    a, b = weights(tmp_path / "a" / "model1mean_0.pth"), weights(tmp_path / "b" / "model1mean_0.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    oof_a, oof_b = (pd.read_csv(tmp_path / d / "model1mean_0_oof.csv") for d in "ab")
    assert oof_a["logit"].tolist() == oof_b["logit"].tolist()


def test_check_models_retrains_flagged_folds_with_their_models_options(tiny_data, root, tmp_path):
    """A retrained fold must match its siblings (same epochs, size, lr), not the bare variant;
    --retrain runs the flagged folds in parallel through train.py's runner."""
    assets = tmp_path / "assets"
    common = ["--data", str(tiny_data), "--assets", str(assets), "--tts_dir", str(tiny_data.parent / "tts"),
              "--n_folds", "3"]
    i = TINY.index("--threads")
    opts = TINY[:i] + TINY[i + 2:] + ["--epochs", "1", "--lr", "0.002"]
    first = subprocess.run([sys.executable, "train.py", *common, "--models", "model1mean", "--folds", "0,1",
                            "--jobs", "2", *opts], cwd=root, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    for p in assets.glob("model1mean_1*"):  # fold 1 lost, fold 2 never trained, fold 0 broken
        p.unlink()
    (assets / "model1mean_0.pth").write_bytes(b"")
    log = assets / "runs" / "model1mean_0" / "stdout.log"
    log.write_text("the first run's log\n")
    check = [sys.executable, "check_models.py", *common, "--models", "model1mean"]
    report = subprocess.run(check, cwd=root, capture_output=True, text=True, timeout=600)
    assert report.returncode == 1
    line = next(l for l in report.stdout.splitlines() if "train_model1mean.py --fold 2" in l)
    for option in ("--epochs 1", "--optim.lr 0.002", "--model.d_model 32", "--data.batch_max_frames 3000"):
        assert option in line, f"{option} missing from {line}"
    assert "--threads" not in line, "threads are the runner's business, not the model's"
    assert "--config" in line, "the retrained fold reads the saved config, not options rebuilt from it"
    retrain = subprocess.run(check + ["--retrain", "--jobs", "2"], cwd=root, capture_output=True, text=True,
                             timeout=600)
    assert retrain.returncode == 0, retrain.stdout[-2000:] + retrain.stderr[-2000:]
    assert "3/3 folds retrained" in retrain.stdout
    for fold in (0, 1, 2):
        cfg = json.loads((assets / f"model1mean_{fold}.json").read_text())["config"]
        assert (cfg["epochs"], cfg["optim"]["lr"], cfg["model"]["d_model"]) == (1, 0.002, 32)
    assert log.read_text().startswith("the first run's log"), "--force clears the run folder but not the job's log"
    assert (assets / "runs" / "model1mean_2" / "requested_config.json").exists(), "fold 2 got its own copy"


def test_batches_built_ahead_train_the_same_weights(tiny_data, root, tmp_path):
    """--prefetch (a background thread building batches, the default on GPU) changes nothing
    but timing: the same augmentation draws, the same order, the same weights."""
    flags = ("--epochs", "2", "--aug_prob", "0.5", "--aug_noise_snr", "10", "--eval_every", "3")
    plain = train(root, tiny_data, tmp_path / "a", *flags, "--prefetch", "0")
    ahead = train(root, tiny_data, tmp_path / "b", *flags, "--prefetch", "3")
    assert plain.returncode == 0 and ahead.returncode == 0, ahead.stderr[-2000:]
    a, b = weights(tmp_path / "a" / "model1mean_0.pth"), weights(tmp_path / "b" / "model1mean_0.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batches_ahead_stops_and_hands_on_errors():
    from readaloud.pipeline.batches import BatchesAhead

    def make(i):
        if i == 3:
            raise ValueError("clip 3 is broken")
        return i * 10
    got = []
    with pytest.raises(ValueError, match="clip 3"):
        for i, b in BatchesAhead(make, range(6), depth=2):
            got.append(b)
    assert got == [0, 10, 20]
    stream = BatchesAhead(lambda i: i, range(1000), depth=2)
    for i, _ in stream:
        if i == 1:
            break
    stream._thread.join(timeout=5)
    assert not stream._thread.is_alive(), "a loop that breaks early leaves no thread building"
