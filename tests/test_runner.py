"""train.py's job runner: the cores of a finished job go to the jobs still running."""
import json
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


# A stand-in that reports how it was run, then fails or crashes if told to.
REPORTER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    args = sys.argv[1:]
    assets = Path(args[args.index("--assets") + 1])
    print("to stdout")
    print("to stderr", file=sys.stderr)
    (assets / "{variant}_how.json").write_text(json.dumps(dict(
        argv=sys.argv, cwd=os.getcwd(), name=__name__, omp=os.environ.get("OMP_NUM_THREADS"),
        marker=os.environ.get("RUNNER_TEST_MARKER"))))
    if "{variant}" == "exits3":
        sys.exit(3)
    if "{variant}" == "raises":
        raise RuntimeError("deliberate crash")
""")


@pytest.mark.parametrize("launch", ["fork", "exec"])
def test_both_launchers_run_a_script_like_python_does(tmp_path, monkeypatch, launch):
    """Forked from the fork server or exec'd, a job sees the same argv, cwd, __name__ and
    environment, its output lands in its stdout.log, and exit codes and crashes come back."""
    scripts = {}
    for v in ("fine", "exits3", "raises"):
        scripts[v] = tmp_path / f"train_{v}.py"
        scripts[v].write_text(REPORTER.format(variant=v))
    monkeypatch.setattr(runner, "script_for", lambda v: scripts[v])
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv(runner.LAUNCH_ENV, launch)
    monkeypatch.chdir(tmp_path)  # jobs run in the repo whatever the caller's directory
    monkeypatch.setenv("RUNNER_TEST_MARKER", f"set after the fork server started ({launch})")
    assert runner.launch_mode(None) == launch
    assets = tmp_path / "assets"
    assets.mkdir()
    results = runner.run_jobs(["fine", "exits3", "raises"], [0], 1, "data", str(assets), "tts", jobs=2,
                              progress=False, poll=0.05)
    assert results == {"fine_0": 0, "exits3_0": 3, "raises_0": 1}
    for v in scripts:
        how = json.loads((assets / f"{v}_how.json").read_text())
        assert how["argv"][0] == str(scripts[v]) and how["argv"][1:3] == ["--fold", "0"]
        assert how["cwd"] == str(runner.ROOT) and how["name"] == "__main__"
        assert how["marker"] == f"set after the fork server started ({launch})"
        assert how["omp"] == "1", "two jobs on two cores: one thread each"
        log = (assets / "runs" / f"{v}_0" / "stdout.log").read_text()
        assert "to stdout" in log and "to stderr" in log
    assert "RuntimeError: deliberate crash" in (assets / "runs" / "raises_0" / "stdout.log").read_text()


def test_launch_mode_refuses_an_unknown_choice_and_execs_for_gpus(monkeypatch):
    monkeypatch.setenv(runner.LAUNCH_ENV, "teleport")
    with pytest.raises(ValueError, match="READALOUD_LAUNCH"):
        runner.launch_mode(None)
    monkeypatch.delenv(runner.LAUNCH_ENV)
    assert runner.launch_mode(["0"]) == "exec"
    assert runner.launch_mode(None) == ("exec" if torch.cuda.is_available() else "fork")


def test_a_dead_fork_server_falls_back_to_fresh_interpreters(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise EOFError("fork server gone")
    monkeypatch.setenv(runner.LAUNCH_ENV, "fork")
    monkeypatch.setattr(runner, "ForkedScript", broken)
    results, assets = run_fake_jobs(tmp_path, monkeypatch)
    assert results == {"quick_0": 0, "slow_0": 0}, "both folds ran, exec'd"
    assert (assets / "slow_seen.txt").read_text() == "1 2 budget"
    assert "could not fork from the fork server" in capsys.readouterr().out
