import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def run_script(root, *args, ok=True, env=None, cwd=None, timeout=900):
    """Run a project script as a user would; on failure show its output."""
    import subprocess
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd or root, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    if ok and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def preprocessed_demo(root, base: Path, n_train: int, n_test: int, seed: int, n_folds: int = 2) -> tuple[Path, Path]:
    """A demo set made and preprocessed under `base`: (data folder, references folder)."""
    data, tts = base / "data", base / "tts"
    run_script(root, "make_demo_data.py", "--out", data, "--n-train", n_train, "--n-test", n_test, "--seed", seed)
    run_script(root, "preprocess.py", "--data", data, "--tts_dir", tts, "--n_folds", n_folds, "--workers", 1)
    return data, tts


def train_folds(root, data: Path, tts: Path, assets: Path, models: str, *options, n_folds: int = 2):
    """train.py on a preprocessed demo set, one job; asserts every fold finished and returns the run."""
    out = run_script(root, "train.py", "--data", data, "--assets", assets, "--tts_dir", tts, "--n_folds", n_folds,
                     "--models", models, "--jobs", 1, *options)
    assert f"{n_folds * len(models.split(','))}/{n_folds * len(models.split(','))} folds finished" in out.stdout
    return out


@pytest.fixture(scope="session")
def chain(tmp_path_factory, root):
    """A tiny demo set run through the whole chain: data, preprocess, train.py (two models x two
    folds, one epoch, two parallel jobs), get_config. Shared by the end-to-end and fault tests."""
    base = tmp_path_factory.mktemp("e2e")
    data, assets, tts = base / "data", base / "assets", base / "tts"
    run_script(root, "make_demo_data.py", "--out", data, "--n-train", 48, "--n-test", 14, "--seed", 3)
    run_script(root, "preprocess.py", "--data", data, "--tts_dir", tts, "--n_folds", 2, "--workers", 1)
    train = run_script(root, "train.py", "--data", data, "--assets", assets, "--tts_dir", tts, "--n_folds", 2,
                       "--models", "model1mean,model3mapd", "--jobs", 2, "--epochs", 1)
    config = run_script(root, "get_config.py", "--assets", assets)
    return {"root": root, "data": data, "assets": assets, "tts": tts, "base": base,
            "train_out": train.stdout, "config_out": config.stdout}
