"""train.py's job runner: the cores of a finished job go to the jobs still running."""
import os
import sys
import textwrap

import pytest
import torch

from readaloud import runner
from readaloud.cpu import THREADS_FILE_ENV, ThreadBudget, write_budget


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_budget_applies_a_changed_thread_count(tmp_path, restore_threads):
    path = tmp_path / "threads"
    write_budget(path, 1)
    budget = ThreadBudget(1, every=0, path=path)
    assert budget.poll() == 1 and torch.get_num_threads() == 1
    write_budget(path, 2)
    os.utime(path, ns=(1, 1))  # a new mtime even on a coarse-clock file system
    assert budget.poll() == 2 and torch.get_num_threads() == 2
    path.write_text("garbage")
    os.utime(path, ns=(2, 2))
    assert budget.poll() == 2, "an unreadable budget keeps the current threads"
    path.unlink()
    assert budget.poll() == 2


def test_budget_without_a_file_keeps_the_start_threads(tmp_path, monkeypatch, restore_threads):
    monkeypatch.delenv(THREADS_FILE_ENV, raising=False)
    budget = ThreadBudget(1, every=0)
    assert budget.path is None and budget.poll() == 1 and torch.get_num_threads() == 1


# A stand-in for train_model*.py: "quick" ends at once; "slow" waits (up to 30 s) for its
# budget file to say 2 threads and reports what it saw in seen.txt.
FAKE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    args = sys.argv[1:]
    assets = Path(args[args.index("--assets") + 1])
    budget = os.environ.get("{env}")
    seen = [args[args.index("--threads") + 1]]
    if "{variant}" == "slow" and budget:
        deadline = time.time() + 30
        while time.time() < deadline and Path(budget).read_text() != "2":
            time.sleep(0.05)
        seen.append(Path(budget).read_text())
    (assets / "{variant}_seen.txt").write_text(" ".join(seen) + (" budget" if budget else " no-budget"))
""")


def run_fake_jobs(tmp_path, monkeypatch, extra=()):
    scripts = {}
    for v in ("quick", "slow"):
        scripts[v] = tmp_path / f"train_{v}.py"
        scripts[v].write_text(FAKE.format(env=THREADS_FILE_ENV, variant=v))
    monkeypatch.setattr(runner, "script_for", lambda v: scripts[v])
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assets = tmp_path / "assets"
    assets.mkdir()
    results = runner.run_jobs(["quick", "slow"], [0], 1, "data", str(assets), "tts", jobs=2,
                              extra=list(extra), progress=False, poll=0.05)
    return results, assets


def test_a_finished_job_gives_its_core_to_the_running_one(tmp_path, monkeypatch):
    results, assets = run_fake_jobs(tmp_path, monkeypatch)
    assert results == {"quick_0": 0, "slow_0": 0}
    assert (assets / "quick_seen.txt").read_text() == "1 budget"
    assert (assets / "slow_seen.txt").read_text() == "1 2 budget", "started on 1 thread, raised to 2"


def test_threads_given_by_the_user_stay_fixed(tmp_path, monkeypatch):
    results, assets = run_fake_jobs(tmp_path, monkeypatch, extra=["--threads", "1"])
    assert results == {"quick_0": 0, "slow_0": 0}
    assert (assets / "slow_seen.txt").read_text() == "1 no-budget"
