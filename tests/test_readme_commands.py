"""Every command of the README runs, on tiny data, so the README cannot go stale.

The commands are the lines of the README's fenced `bash` blocks (comments dropped, `\\` lines
joined), run in the README's order, each as written, in a directory that looks like a checkout
(a copy of the repo's files, the venv linked in, its own data/, assets/, tts_data/). Only what makes them tiny is
changed, by the rules of RUNNERS: `make demo` on 24 training / 8 test clips, 2 folds, 1 epoch,
Whisper tiny.en only; the real-data workflow on a copy of that data set (with a speakers.csv),
its `--n_folds 6` as 2; `make test` is this very suite, so it is only expanded (`make -n`).

A README command that no rule of RUNNERS matches fails `test_every_readme_command_has_a_runner`:
whoever adds a command to the README adds how it is run here.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# what a checkout's own runs write: each workspace has its own, never the repo's
OUTPUTS = {"data", "assets", "tts_data", "submission.csv", "submission.csv.json", "submission.zip", "review",
           "bench_out", "corrections.csv", ".git", ".pytest_cache"}
N_TRAIN, N_TEST, FOLDS = 24, 8, 2
# what every train.py of this test adds: one epoch, one Whisper (model6asr's second one, base, is the slow part)
TINY_TRAIN = ["--epochs", "1", "--asr_backbones", "whisper-tiny.en"]
MAKE = ["make", "--no-print-directory", "-o", ".venv/.installed"]   # never (re)build the venv


def readme_commands(text: str) -> list[str]:
    """The command lines of the fenced bash blocks of a README text, in order."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def checkout_view(dest: Path) -> Path:
    """A directory that runs the repo's scripts and Makefile as a checkout does, with its own outputs:
    a copy of the working tree's files (train.py runs its folds in the directory its package lives in,
    so links to the repo would write there), the venv linked."""
    dest.mkdir(parents=True)
    for entry in ROOT.iterdir():
        if entry.name in OUTPUTS:
            continue
        if entry.name == ".venv":
            (dest / entry.name).symlink_to(entry)
        elif entry.is_dir():
            shutil.copytree(entry, dest / entry.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(entry, dest / entry.name)
    installed = ROOT / ".venv" / ".installed"
    if installed.exists():   # make's sub-makes do not inherit -o: the venv must also look newer than its inputs
        older = installed.stat().st_mtime - 1
        os.utime(dest / "requirements.txt", (older, older))
    return dest


def run(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def shown(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def python_args(command: str) -> list[str]:
    args = command.split()
    assert args[0] == "python", command
    return [sys.executable, *args[1:]]


# ---- how each README command is run -----------------------------------------------------------------------

def run_make_demo(command, ws):
    """`make demo` with the Makefile's own variables made tiny (EPOCHS also carries the Whisper choice:
    it is the one variable the Makefile hands to train.py as it is)."""
    demo = ws.demo
    proc = run([*MAKE, *command.split()[1:], f"PY={sys.executable}", f"N_TRAIN={N_TRAIN}", f"N_TEST={N_TEST}",
                f"FOLDS={FOLDS}", "JOBS=2", f"EPOCHS={' '.join(TINY_TRAIN[1:])}"], demo)
    assert proc.returncode == 0, shown(proc)
    assert "test log loss" in proc.stdout and "make demo finished in" in proc.stdout, shown(proc)
    sub = pd.read_csv(demo / "submission.csv")
    assert len(sub) == N_TEST and sub["score"].between(0, 1, inclusive="neither").all()
    assert (demo / "submission.csv.json").exists()


def run_make_test(command, ws):
    """The suite this test belongs to: expanded, not run."""
    proc = run([*MAKE, "-n", *command.split()[1:], f"PY={sys.executable}"], ws.demo)
    assert proc.returncode == 0 and "-m pytest" in proc.stdout and " tests" in proc.stdout, shown(proc)


def run_make_submission(command, ws):
    proc = run([*MAKE, *command.split()[1:], f"PY={sys.executable}"], ws.real)
    assert proc.returncode == 0, shown(proc)
    with zipfile.ZipFile(ws.real / "submission.zip") as z:
        names = set(z.namelist())
    assert "main.py" in names and "assets/model_configs.json" in names


def run_preprocess(command, ws):
    args = python_args(command)
    if "--n_folds" in args:
        args[args.index("--n_folds") + 1] = str(FOLDS)
    else:
        args += ["--n_folds", str(FOLDS)]
    if "--corrections" in command:
        test = pd.read_csv(ws.real / "data" / "test_metadata.csv")
        pd.DataFrame({"filename": [test["filename"].iloc[0]], "score": [1]}).to_csv(
            ws.real / "corrections.csv", index=False)
    proc = run([*args, "--workers", "1"], ws.real)
    assert proc.returncode == 0, shown(proc)
    if "--corrections" in command:
        labels = pd.read_csv(ws.real / "data" / "train_labels.csv")
        assert test["filename"].iloc[0] in set(labels["filename"]), "the marked test clip joined training"
    if "--groups" in command:
        assert "groups:" in proc.stdout, shown(proc)


def run_train(command, ws):
    proc = run([*python_args(command), *TINY_TRAIN], ws.real)
    assert proc.returncode == 0, shown(proc)
    assert list((ws.real / "assets").glob("*_0.pth")), "folds were trained"


def run_check_models(command, ws):
    proc = run(python_args(command), ws.real)
    assert proc.returncode in (0, 1) and "OOF" in proc.stdout, shown(proc)   # 1: it flagged folds


def run_get_config(command, ws):
    proc = run(python_args(command), ws.real)
    assert proc.returncode == 0 and (ws.real / "assets" / "model_configs.json").exists(), shown(proc)


def run_infer(command, ws):
    proc = run([*python_args(command), "--no_progress"], ws.real)
    assert proc.returncode == 0, shown(proc)
    sub = pd.read_csv(ws.real / "submission.csv")
    fmt = pd.read_csv(ws.real / "data" / "submission_format.csv")
    assert sub["filename"].tolist() == fmt["filename"].tolist()
    if "--report" in command:
        report = command.split()[command.split().index("--report") + 1]
        assert (ws.real / report / "index.html").exists(), shown(proc)


def run_plan(command, ws):
    """The plan on the real-data workspace, its rates measured on 6 clips, tiny.en only: a table with a total,
    and the data folder left as it was."""
    data = ws.real / "data"
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file()}
    proc = run([*python_args(command), "--sample", "6", "--asr_backbones", "whisper-tiny.en"], ws.real)
    assert proc.returncode == 0 and "| **total** |" in proc.stdout, shown(proc)
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file()} == before, "the plan wrote into data/"


RUNNERS = [
    (r"make demo", run_make_demo),
    (r"make test", run_make_test),
    (r"make submission", run_make_submission),
    (r"python -m readaloud\.pipeline\.plan( .*)?", run_plan),
    (r"python preprocess\.py( .*)?", run_preprocess),
    (r"python train\.py( .*)?", run_train),
    (r"python check_models\.py( .*)?", run_check_models),
    (r"python get_config\.py( .*)?", run_get_config),
    (r"python infer\.py( .*)?", run_infer),
]


def runner_of(command: str):
    for pattern, runner in RUNNERS:
        if re.fullmatch(pattern, command):
            return runner
    return None


COMMANDS = readme_commands(README.read_text())


class Workspaces:
    """`demo`: where `make demo` runs from scratch; `real`: the real-data workflow, on a data folder laid
    out as the README asks (the demo's clips and CSVs, a speakers.csv, no fold file) with the demo's
    caches (clips, references, Whisper evidence) copied, so that it trains without decoding again."""

    def __init__(self, base: Path):
        self.base = base
        self.demo = checkout_view(base / "demo")
        self._real = None

    @property
    def real(self) -> Path:
        if self._real is None:
            real = checkout_view(self.base / "real")
            if not (self.demo / "data" / "train_metadata.csv").exists():
                proc = run([sys.executable, "make_demo_data.py", "--out", "data", "--n-train", str(N_TRAIN),
                            "--n-test", str(N_TEST), "--seed", "0"], self.demo)
                assert proc.returncode == 0, shown(proc)
            shutil.copytree(self.demo / "data", real / "data",
                            ignore=lambda d, names: [n for n in names if n.startswith("folds_")])
            if (self.demo / "tts_data").exists():
                shutil.copytree(self.demo / "tts_data", real / "tts_data")
            train = pd.read_csv(real / "data" / "train_metadata.csv")
            speakers = [f"child{i % 6}" for i in range(len(train))]
            pd.DataFrame({"filename": train["filename"], "speaker": speakers}).to_csv(
                real / "data" / "speakers.csv", index=False)
            self._real = real
        return self._real


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory):
    return Workspaces(tmp_path_factory.mktemp("readme"))


def test_the_readme_shows_commands_and_the_parser_reads_them():
    assert {"make demo", "make test"} <= set(COMMANDS)
    text = "```bash\nmake demo   # a comment\n# only a comment\npython a.py --x 1 \\\n    --y 2\n```\n```\nnot bash\n```\n"
    assert readme_commands(text) == ["make demo", "python a.py --x 1 --y 2"]


def test_every_readme_command_has_a_runner():
    unrun = [c for c in COMMANDS if runner_of(c) is None]
    assert not unrun, f"README commands no test runs (add a rule to RUNNERS in {Path(__file__).name}): {unrun}"
    assert runner_of("python pretrain.py") is None, "an unknown command is caught"


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs_on_tiny_data(command, workspaces):
    runner = runner_of(command)
    if runner is None:
        pytest.fail(f"no runner for {command!r}")
    runner(command, workspaces)
