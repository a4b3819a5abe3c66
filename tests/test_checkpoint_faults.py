"""Saves are atomic, leftovers are cleaned, and broken checkpoints are reported with the fix."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import run_script
from readaloud.checkpoints import atomic_save, clean_temp_files, safe_load


def test_a_save_killed_midway_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    atomic_save({"state_dict": {"w": torch.zeros(3)}}, path)

    def dies_halfway(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is stopped in the middle of writing

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"state_dict": {"w": torch.ones(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(safe_load(path)["state_dict"]["w"], torch.zeros(3)), "the old file is intact"
    assert not list(tmp_path.glob(".*tmp*")), "no half-written temporary file is left"


def test_a_hard_kill_during_a_save_leaves_old_or_new(tmp_path):
    """SIGKILL a process while it saves in a loop: the target always loads."""
    path = tmp_path / "model.pth"
    code = (f"import torch, sys; sys.path.insert(0, {str(os.getcwd())!r});"
            "from readaloud.checkpoints import atomic_save\n"
            f"i = 0\nwhile True:\n    atomic_save({{'state_dict': {{'w': torch.full((200000,), float(i))}}}}, {str(path)!r}); i += 1")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=os.getcwd())
    import time
    deadline = time.time() + 60
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    w = safe_load(path)["state_dict"]["w"]
    assert torch.all(w == w[0]), "a complete checkpoint, old or new"
    leftovers = list(tmp_path.glob(".*.tmp*"))
    assert clean_temp_files(tmp_path) == len(leftovers) and not list(tmp_path.glob(".*.tmp*"))


def test_check_models_reports_broken_and_missing_folds(chain, tmp_path):
    assets = tmp_path / "assets"
    shutil.copytree(chain["assets"], assets)
    (assets / "model1mean_0.pth").write_bytes(b"")
    data = (assets / "model3mapd_1.pth").read_bytes()
    (assets / "model3mapd_1.pth").write_bytes(data[:1000])
    (assets / "model3mapd_0.pth").unlink()
    (assets / "model3mapd_0_oof.csv").unlink()
    shutil.rmtree(assets / "runs" / "model3mapd_0")
    res = run_script(chain["root"], "check_models.py", "--data", chain["data"], "--assets", assets,
                     "--n_folds", 2, ok=False)
    assert res.returncode == 1
    out = res.stdout
    assert "model1mean fold 0: broken" in out and "model1mean_0.pth: checkpoint is empty" in out
    assert "model3mapd fold 1: broken" in out and "cannot load checkpoint" in out
    assert "model3mapd fold 0: missing" in out
    assert "train_model1mean.py --fold 0 --n_folds 2" in out and "--force" in out
