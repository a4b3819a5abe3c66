"""Folds and inference as Ray tasks (train.py --ray, check_models.py --retrain --ray, infer.py --ray)
on a real local Ray cluster of 2 CPUs (the one train.py --ray starts, and one the scripts join by
address): the weights equal those of the same folds run with --jobs 1; a fold whose process or
whose Ray worker is killed is retried and resumes to the same weights; a fold that fails for good
is reported with its log while the others finish; sharded inference gives one process's submission."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import run_script
from readaloud import ray_jobs

# the smallest model the trainer tests use; one torch thread, as a Ray fold of 1 CPU gets
# the trainer's mechanics on a tiny small encoder (--backbone scratch: model1mean reads tiny.en by default)
TINY = ["--backbone", "scratch", "--d_model", "32", "--encoder_layers", "1", "--encoder_heads", "2", "--ffn_dim", "64",
        "--threads", "1", "--batch_max_frames", "3000", "--match_dim", "16"]
FOLDS = (0, 1)
EPOCHS = 3  # a fold killed after its first and after its second checkpoint still has an epoch to go


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, root):
    base = tmp_path_factory.mktemp("ray")
    data, tts = base / "data", base / "tts"
    run_script(root, "make_demo_data.py", "--out", data, "--n-train", 48, "--n-test", 14, "--seed", 3)
    run_script(root, "preprocess.py", "--data", data, "--tts_dir", tts, "--n_folds", 2, "--workers", 1)
    return {"root": root, "data": data, "tts": tts, "base": base}


def train(tiny, assets, *extra, env=None, ok=True):
    return run_script(tiny["root"], "train.py", "--data", tiny["data"], "--tts_dir", tiny["tts"], "--assets", assets,
                      "--n_folds", 2, "--models", "model1mean", "--epochs", EPOCHS, *TINY, *extra, env=env, ok=ok)


@pytest.fixture(scope="module")
def cluster():
    """A running local Ray cluster of 2 CPUs that scripts join with --ray ADDRESS."""
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=ray_jobs.LOCAL_OBJECT_STORE)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def baseline(tiny):
    assets = tiny["base"] / "jobs1"
    train(tiny, assets, "--jobs", 1)
    return assets


@pytest.fixture(scope="module")
def ray_run(tiny):
    assets = tiny["base"] / "ray"
    return assets, train(tiny, assets, "--ray", "--cpus_per_fold", 1)


def assert_same_fold(a: Path, b: Path, fold: int) -> None:
    """Every tensor of the fold's checkpoint and its out-of-fold predictions are equal."""
    wa = torch.load(a / f"model1mean_{fold}.pth", weights_only=True)["state_dict"]
    wb = torch.load(b / f"model1mean_{fold}.pth", weights_only=True)["state_dict"]
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"fold {fold}: {len(different)} tensors differ, e.g. {different[:3]}"
    pd.testing.assert_frame_equal(pd.read_csv(a / f"model1mean_{fold}_oof.csv"),
                                  pd.read_csv(b / f"model1mean_{fold}_oof.csv"))


def logs(assets: Path, fold: int) -> tuple[str, str]:
    run = assets / "runs" / f"model1mean_{fold}"
    return (run / "stdout.log").read_text(), (run / "train.log").read_text()


def test_ray_folds_train_the_same_weights_as_jobs_1(tiny, baseline, ray_run):
    assets, run = ray_run
    assert "2 folds submitted to Ray (1 CPU, 0 GPU each" in run.stdout and "2/2 folds finished" in run.stdout
    for fold in FOLDS:
        assert_same_fold(baseline, assets, fold)
        stdout_log, _ = logs(assets, fold)
        assert stdout_log.startswith("[ray] attempt 1 on ") and "attempt 2" not in stdout_log



def test_finished_folds_are_skipped_without_a_cluster(tiny, ray_run, capsys, monkeypatch):
    monkeypatch.setattr(ray_jobs, "connect", lambda *a, **k: pytest.fail("no fold left: no cluster needed"))
    codes = ray_jobs.run_jobs_on_ray(["model1mean"], list(FOLDS), tiny["data"], ray_run[0], tiny["tts"])
    assert codes == {"model1mean_0": 0, "model1mean_1": 0}
    assert capsys.readouterr().out.count("finished already, skipped") == 2


def _fold_process(assets: Path, fold: int, not_pid: int | None = None, timeout: float = 600) -> int:
    """The pid of the running `train_model1mean.py --fold <fold>` writing to `assets` (not `not_pid`)."""
    want = ["train_model1mean.py", "--fold", str(fold), "--assets", str(assets)]
    end = time.time() + timeout
    while time.time() < end:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if int(pid) != not_pid and any(a.endswith(want[0]) for a in argv) and all(w in argv for w in want[1:]):
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no fold process for {want} within {timeout}s")


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _state(path: Path):
    try:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns
    except OSError:
        return None


def _wait_for(condition, proc, what: str, timeout: float = 600) -> None:
    """Poll until `condition`; the timeout only bounds a hung run (a fold's first checkpoint took
    over 180 s once when the 2 cores were shared with a benchmark)."""
    end = time.time() + timeout
    while not condition():
        assert proc.poll() is None and time.time() < end, f"train.py ended or timed out before {what}"
        time.sleep(0.02)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the processes through /proc")
def test_killed_folds_and_workers_are_retried_and_resume_while_a_failing_fold_is_reported(tiny, baseline, cluster,
                                                                                         tmp_path):
    """Fold 0's process is killed after its first checkpoint; the retry resumes, and the Ray worker
    running it is killed after the retry's own checkpoint; the third attempt resumes again and
    ends with the weights of an uninterrupted fold. Fold 1 cannot resume (its last.pth is
    damaged): it fails for good, is not retried, and is reported with its log."""
    broken = tmp_path / "runs" / "model1mean_1" / "last.pth"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a checkpoint")
    cmd = [sys.executable, "train.py", "--data", str(tiny["data"]), "--tts_dir", str(tiny["tts"]), "--assets",
           str(tmp_path), "--n_folds", "2", "--models", "model1mean", "--epochs", str(EPOCHS), *TINY, "--ray", cluster]
    proc = subprocess.Popen(cmd, cwd=tiny["root"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    log0, last0 = tmp_path / "runs" / "model1mean_0" / "stdout.log", tmp_path / "runs" / "model1mean_0" / "last.pth"
    try:
        first = _fold_process(tmp_path, 0)
        _wait_for(last0.exists, proc, "fold 0's first checkpoint")
        os.kill(first, signal.SIGKILL)  # the fold process dies mid-fold
        _wait_for(lambda: "[ray] attempt 2 on " in log0.read_text(), proc, "fold 0's retry")
        before = _state(last0)  # the killed attempt's checkpoint; the retry needs seconds to write its own
        worker = _parent(_fold_process(tmp_path, 0, not_pid=first))
        _wait_for(lambda: _state(last0) != before, proc, "the retry's checkpoint")
        os.kill(worker, signal.SIGKILL)  # the Ray worker running the retry dies
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out[-3000:]
    assert "1/2 folds finished; failed: model1mean_1" in out
    stdout_log, train_log = logs(tmp_path, 0)
    assert "killed (exit -9): Ray retries it" in stdout_log and "[ray] attempt 3 on " in stdout_log
    assert train_log.count("resumed from") == 2 and "at epoch 1" in train_log and "at epoch 2" in train_log
    assert_same_fold(baseline, tmp_path, 0)
    report = out[out.index("model1mean_1: FAILED"):]
    assert "log: " in report and "cannot load checkpoint" in report, "the failure comes with its log's tail"
    assert "[ray] attempt 2" not in logs(tmp_path, 1)[0], "an ordinary failure is not retried"


def test_check_models_retrains_a_broken_fold_on_ray(tiny, baseline, ray_run, cluster, tmp_path):
    assets = tmp_path / "assets"
    shutil.copytree(ray_run[0], assets)
    (assets / "model1mean_1.pth").write_bytes(b"")
    common = ["--data", tiny["data"], "--assets", assets, "--tts_dir", tiny["tts"], "--n_folds", 2]
    run = run_script(tiny["root"], "check_models.py", *common, "--retrain", "--ray", cluster)
    assert "1 folds submitted to Ray" in run.stdout and "1/1 folds retrained" in run.stdout
    assert_same_fold(baseline, assets, 1)


def test_a_retry_resumes_only_from_a_checkpoint_of_its_own(tmp_path):
    """--force on the first attempt; a retry after it wrote last.pth drops --force/--restart/--resume,
    a retry before (or a new run) keeps them."""
    record, last = str(tmp_path / "attempt.json"), tmp_path / "last.pth"
    last.write_bytes(b"an old run's checkpoint")
    argv = ["train_model1mean.py", "--fold", "0", "--force", "--restart", "--resume", "x.pth", "--lr", "1"]
    assert ray_jobs._attempt_argv(argv, record, "run1", str(last)) == (argv, 1)
    assert ray_jobs._attempt_argv(argv, record, "run1", str(last)) == (argv, 2), "no checkpoint of its own yet"
    last.unlink()
    last.write_bytes(b"this run's checkpoint, a new file")
    assert ray_jobs._attempt_argv(argv, record, "run1", str(last)) == \
        (["train_model1mean.py", "--fold", "0", "--lr", "1"], 3)
    assert ray_jobs._attempt_argv(argv, record, "run2", str(last)) == (argv, 1), "a new run starts over"
    assert json.loads(Path(record).read_text())["token"] == "run2"


def test_a_node_without_the_drivers_files_refuses_the_fold(tmp_path):
    token = tmp_path / "driver"
    token.write_text("the driver's token")
    out = ray_jobs.run_script_attempt(["never_run.py"], str(tmp_path), {}, str(tmp_path / "log"),
                                    str(tmp_path / "rec"), str(tmp_path / "last"), str(token), "another token")
    assert out["code"] == -1 and "does not see the driver's files" in out["error"]
    assert not (tmp_path / "log").exists()


def test_a_request_no_node_fits_is_refused():
    class FakeRay:
        @staticmethod
        def nodes():
            return [{"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 8.0}}]
    ray_jobs.check_fits(FakeRay, 2, 0)
    with pytest.raises(ray_jobs.RayJobError, match=r"no node .* 1 CPUs and 0.5 GPUs .*10.0.0.1: 8 CPU 0 GPU"):
        ray_jobs.check_fits(FakeRay, 1, 0.5)


@pytest.fixture(scope="module")
def ensemble(tiny, ray_run):
    """The Ray-trained folds with ensemble weights, and infer.py's submission in one process."""
    assets = tiny["base"] / "ensemble"
    shutil.copytree(ray_run[0], assets)
    run_script(tiny["root"], "get_config.py", "--data", tiny["data"], "--assets", assets)
    single = run_script(tiny["root"], "infer.py", "--data", tiny["data"], "--assets", assets, "--tts_dir", tiny["tts"],
                        "--out", tiny["base"] / "single.csv", "--no_progress")
    return assets, single


def test_infer_on_ray_merges_its_shards_into_the_submission_of_one_process(tiny, ensemble, cluster, tmp_path):
    assets, single = ensemble
    out = tmp_path / "submission.csv"
    fanned = run_script(tiny["root"], "infer.py", "--data", tiny["data"], "--assets", assets, "--tts_dir", tiny["tts"],
                        "--out", out, "--ray", cluster, "--ray_shards", 2, "--no_progress")
    assert "14 rows in 2 shards submitted to Ray" in fanned.stdout
    fmt = pd.read_csv(tiny["data"] / "submission_format.csv")
    a, b = pd.read_csv(tiny["base"] / "single.csv"), pd.read_csv(out)
    assert b["filename"].tolist() == fmt["filename"].tolist(), "the submission format's rows, in its order"
    gap = float((a["score"] - b["score"]).abs().max())
    assert gap < 1e-6, f"shards predict what one process predicts (largest difference {gap:.2e})"
    loss = [line for line in single.stdout.splitlines() if line.startswith("test log loss")]
    assert loss and loss[0] in fanned.stdout, "the same test log losses, computed over every shard"
    assert not list((assets / ray_jobs.RAY_DIR).glob("infer-*")), "the shards' files are removed once merged"


def test_a_failed_shard_leaves_its_rows_to_the_task_priors(tiny, ensemble, tmp_path):
    assets, _ = ensemble
    fmt = pd.read_csv(tiny["data"] / "submission_format.csv")
    names = fmt["filename"].tolist()
    good = tmp_path / "shard_0.csv"
    pd.DataFrame({"filename": names[:8], "score": 0.25}).to_csv(good, index=False)
    good.with_name("shard_0.csv.json").write_text(json.dumps(
        {"checkpoints_used": 2, "checkpoints_listed": 2, "models_used": ["model1mean"], "fallback_rows": 0}))
    parts = {"shard 1/2": (good, names[:8]), "shard 2/2": (tmp_path / "shard_1.csv", names[8:])}
    out = tmp_path / "submission.csv"
    result = ray_jobs.merge_shards(fmt, parts, {"shard 2/2": {"code": 1}}, str(tiny["data"]), str(assets), out,
                                   tmp_path)
    sub = pd.read_csv(out)
    assert sub["filename"].tolist() == names and (sub["score"][:8] == 0.25).all()
    priors = pd.read_csv(tmp_path / "fallback.csv").set_index("filename")["score"]
    assert sub["score"][8:].tolist() == priors.loc[names[8:]].tolist()
    assert "shard 2/2 (exit 1)" in result["error"] and result["fallback_rows"] == len(names) - 8


def test_a_fold_gets_the_drivers_settings_and_its_threads(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # make demo's kernel pin: the same bits on every node
    monkeypatch.setenv("READALOUD_LAUNCH", "exec")
    monkeypatch.setenv("SOME_PASSWORD", "not for the cluster")
    env = ray_jobs.forwarded_env(3)
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["READALOUD_LAUNCH"] == "exec" and "SOME_PASSWORD" not in env
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    argv = ray_jobs.fold_argv("model1mean", 2, "/d", "/a", "/t", ["--force"], ["--lr", "1"], 3)
    assert argv[0].endswith("train_model1mean.py") and argv[1:3] == ["--fold", "2"] and argv[-2:] == ["--threads", "3"]
    assert ray_jobs.fold_argv("model1mean", 2, "/d", "/a", "/t", [], ["--threads", "1"], 3).count("--threads") == 1
