"""train.py's job runner: jobs in parallel processes, each with a fixed share of the cores,
forked from the fork server or exec'd."""
import json
import os
import textwrap

import pytest
import torch

from readaloud.pipeline import launch as launch_module
from readaloud.pipeline import runner

# A stand-in for train_model*.py: "quick" ends at once; "slow" outlives it, then reports the
# threads it was given and saw (--threads, OMP_NUM_THREADS) in seen.txt.
FAKE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    args = sys.argv[1:]
    assets = Path(args[args.index("--assets") + 1])
    if "{variant}" == "slow":
        deadline = time.time() + 30
        while time.time() < deadline and not (assets / "runs" / "quick_0" / "done").exists():
            time.sleep(0.05)
        time.sleep(0.3)  # the runner has seen the quick job end
    else:
        (assets / "runs" / "quick_0" / "done").write_text("")
    seen = [args[args.index("--threads") + 1], os.environ.get("OMP_NUM_THREADS")]
    (assets / "{variant}_seen.txt").write_text(" ".join(seen))
""")


def run_fake_jobs(tmp_path, monkeypatch, extra=()):
    scripts = {}
    for v in ("quick", "slow"):
        scripts[v] = tmp_path / f"train_{v}.py"
        scripts[v].write_text(FAKE.format(variant=v))
    monkeypatch.setattr(runner, "script_for", lambda v: scripts[v])
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assets = tmp_path / "assets"
    assets.mkdir()
    results = runner.run_jobs(["quick", "slow"], [0], "data", str(assets), "tts", jobs=2,
                              extra=list(extra), progress=False, poll=0.05)
    return results, assets


def test_a_job_keeps_its_share_of_the_cores(tmp_path, monkeypatch):
    """Two jobs on two cores: one thread each, for their whole run (a thread count that changed
    when another job ends would make the numbers depend on timing)."""
    results, assets = run_fake_jobs(tmp_path, monkeypatch)
    assert results == {"quick_0": 0, "slow_0": 0}
    assert (assets / "quick_seen.txt").read_text() == "1 1"
    assert (assets / "slow_seen.txt").read_text() == "1 1", "still one thread after the other job ended"


def test_a_lone_fold_gets_the_threads_of_a_full_run(tmp_path, monkeypatch):
    """One fold left (a rerun, a resume) trains at the thread count a full --jobs 2 run gave it,
    so it comes out with the same bits (it used to get both cores)."""
    script = tmp_path / "train_quick.py"
    script.write_text(FAKE.format(variant="quick"))
    monkeypatch.setattr(runner, "script_for", lambda v: script)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assets = tmp_path / "assets"
    assets.mkdir()
    assert runner.run_jobs(["quick"], [0], "data", str(assets), "tts", jobs=2, progress=False,
                           poll=0.05) == {"quick_0": 0}
    assert (assets / "quick_seen.txt").read_text() == "1 1"


def test_threads_given_by_the_user_stay_fixed(tmp_path, monkeypatch):
    results, assets = run_fake_jobs(tmp_path, monkeypatch, extra=["--threads", "1"])
    assert results == {"quick_0": 0, "slow_0": 0}
    assert (assets / "slow_seen.txt").read_text().split()[0] == "1"


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


@pytest.mark.parametrize("how", ["fork", "exec"])
def test_both_launchers_run_a_script_like_python_does(tmp_path, monkeypatch, how):
    """Forked from the fork server or exec'd, a job sees the same argv, cwd, __name__ and
    environment, its output lands in its stdout.log, and exit codes and crashes come back."""
    scripts = {}
    for v in ("fine", "exits3", "raises"):
        scripts[v] = tmp_path / f"train_{v}.py"
        scripts[v].write_text(REPORTER.format(variant=v))
    monkeypatch.setattr(runner, "script_for", lambda v: scripts[v])
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv(launch_module.LAUNCH_ENV, how)
    monkeypatch.chdir(tmp_path)  # jobs run in the repo whatever the caller's directory
    monkeypatch.setenv("RUNNER_TEST_MARKER", f"set after the fork server started ({how})")
    assert launch_module.launch_mode(None) == how
    assets = tmp_path / "assets"
    assets.mkdir()
    results = runner.run_jobs(["fine", "exits3", "raises"], [0], "data", str(assets), "tts", jobs=2,
                              progress=False, poll=0.05)
    assert results == {"fine_0": 0, "exits3_0": 3, "raises_0": 1}
    for v in scripts:
        ran = json.loads((assets / f"{v}_how.json").read_text())
        assert ran["argv"][0] == str(scripts[v]) and ran["argv"][1:3] == ["--fold", "0"]
        assert ran["cwd"] == str(runner.ROOT) and ran["name"] == "__main__"
        assert ran["marker"] == f"set after the fork server started ({how})"
        assert ran["omp"] == "1", "two jobs on two cores: one thread each"
        log = (assets / "runs" / f"{v}_0" / "stdout.log").read_text()
        assert "to stdout" in log and "to stderr" in log
    assert "RuntimeError: deliberate crash" in (assets / "runs" / "raises_0" / "stdout.log").read_text()


def test_launch_mode_refuses_an_unknown_choice_and_execs_for_gpus(monkeypatch):
    monkeypatch.setenv(launch_module.LAUNCH_ENV, "teleport")
    with pytest.raises(ValueError, match="READALOUD_LAUNCH"):
        launch_module.launch_mode(None)
    monkeypatch.delenv(launch_module.LAUNCH_ENV)
    assert launch_module.launch_mode(["0"]) == "exec"
    assert launch_module.launch_mode(None) == ("exec" if torch.cuda.is_available() else "fork")


def test_a_dead_fork_server_falls_back_to_fresh_interpreters(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise EOFError("fork server gone")
    monkeypatch.setenv(launch_module.LAUNCH_ENV, "fork")
    monkeypatch.setattr(launch_module, "ForkedScript", broken)
    results, assets = run_fake_jobs(tmp_path, monkeypatch)
    assert results == {"quick_0": 0, "slow_0": 0}, "both folds ran, exec'd"
    assert (assets / "slow_seen.txt").read_text() == "1 1"
    assert "could not fork from the fork server" in capsys.readouterr().out


def test_fold_jobs_get_absolute_folders_whatever_the_callers_directory(tmp_path, monkeypatch):
    """A fold job starts in the repository: folders given relative to the caller's directory reach it
    as absolute paths (train.py started from elsewhere once failed with 'no fold file')."""
    script = tmp_path / "train_echo.py"
    script.write_text("import sys, json, pathlib\n"
                      "a = sys.argv[1:]\n"
                      "pathlib.Path(a[a.index('--assets') + 1], 'argv.json').write_text(json.dumps(a))\n")
    monkeypatch.setattr(runner, "script_for", lambda v: script)
    work = tmp_path / "elsewhere"
    (work / "assets").mkdir(parents=True)
    monkeypatch.chdir(work)
    assert runner.run_jobs(["echo"], [0], "data", "assets", "tts", jobs=1, progress=False, poll=0.05) == {"echo_0": 0}
    argv = json.loads((work / "assets" / "argv.json").read_text())
    for flag, name in (("--data", "data"), ("--assets", "assets"), ("--tts_dir", "tts")):
        assert argv[argv.index(flag) + 1] == str(work / name)
