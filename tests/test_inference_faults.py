"""The offline runtime never crashes and never loses the submission: missing or broken
models, corrupt clips, a time limit, no network, and the packed submission.zip."""
import json
import shutil
import zipfile

import numpy as np
import pandas as pd
import pytest

from conftest import run_script

BLOCK_NETWORK = '''
import socket
def _blocked(*args, **kwargs):
    raise OSError("network blocked by the test")
socket.socket.connect = _blocked
socket.socket.connect_ex = _blocked
socket.create_connection = _blocked
'''


@pytest.fixture
def no_network(tmp_path):
    d = tmp_path / "netblock"
    d.mkdir()
    (d / "sitecustomize.py").write_text(BLOCK_NETWORK)
    return {"PYTHONPATH": str(d), "HF_HUB_OFFLINE": "0"}


def valid_submission(path, data):
    sub, fmt = pd.read_csv(path), pd.read_csv(data / "submission_format.csv")
    assert list(sub.columns) == ["filename", "score"]
    assert sub["filename"].tolist() == fmt["filename"].tolist()
    assert np.isfinite(sub["score"]).all() and ((sub["score"] > 0) & (sub["score"] < 1)).all()
    return sub


def infer(chain, assets, out, *extra, data=None, env=None, ok=True):
    data = data or chain["data"]
    return run_script(chain["root"], "infer.py", "--data", data, "--assets", assets, "--tts_dir", chain["tts"],
                      "--out", out, "--no_progress", *extra, env=env, ok=ok)


def copy_assets(chain, tmp_path):
    dst = tmp_path / "assets"
    shutil.copytree(chain["assets"], dst, ignore=shutil.ignore_patterns("runs"))
    return dst


def test_the_network_guard_works(chain, no_network):
    probe = run_script(chain["root"], "-c", "import socket; socket.create_connection(('127.0.0.1', 9))",
                       env=no_network, ok=False)
    assert probe.returncode != 0 and "network blocked by the test" in probe.stderr


def test_infer_makes_no_network_connection(chain, tmp_path, no_network):
    out = tmp_path / "sub.csv"
    res = infer(chain, chain["assets"], out, env=no_network)
    assert res.returncode == 0
    valid_submission(out, chain["data"])


def test_missing_and_broken_checkpoints_are_dropped(chain, tmp_path):
    assets = copy_assets(chain, tmp_path)
    config = json.loads((assets / "model_configs.json").read_text())
    config["members"] = [{"model": m, "weight": 0.5, "folds": [0, 1], "checkpoints": [f"{m}_0.pth", f"{m}_1.pth"]}
                         for m in ("model1mean", "model3mapd")]  # every trained checkpoint listed
    (assets / "model_configs.json").write_text(json.dumps(config))
    listed = [c for m in config["members"] for c in m["checkpoints"]]
    (assets / listed[0]).unlink()
    data = (assets / listed[1]).read_bytes()
    (assets / listed[1]).write_bytes(data[: len(data) // 3])
    out = tmp_path / "sub.csv"
    res = infer(chain, assets, out)
    assert res.returncode == 0 and "dropping" in res.stderr
    assert "python train_model" in res.stderr and "--n_folds 2 --force" in res.stderr, "the fix is named"
    result = json.loads(out.with_name("sub.csv.json").read_text())
    assert result["checkpoints_used"] == len(listed) - 2
    valid_submission(out, chain["data"])


def test_no_usable_model_still_writes_priors_and_exits_nonzero(chain, tmp_path):
    assets = copy_assets(chain, tmp_path)
    for p in assets.glob("*.pth"):
        p.write_bytes(b"")
    out = tmp_path / "sub.csv"
    res = infer(chain, assets, out, ok=False)
    assert res.returncode == 2
    sub = valid_submission(out, chain["data"])
    assert sub["score"].nunique() <= 4, "task priors only"


def test_corrupt_test_clips_get_the_prior(chain, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(chain["data"], data, ignore=shutil.ignore_patterns("cache"))
    test = pd.read_csv(data / "test_metadata.csv")
    (data / test["filename"][0]).write_bytes(b"RIFF....WAVEnot really")
    (data / test["filename"][1]).write_bytes(b"")
    out = tmp_path / "sub.csv"
    res = infer(chain, chain["assets"], out, data=data)
    assert res.returncode == 0
    result = json.loads(out.with_name("sub.csv.json").read_text())
    assert result["fallback_rows"] == 2
    valid_submission(out, data)


def test_time_limit_uses_fewer_checkpoints(chain, tmp_path):
    out = tmp_path / "sub.csv"
    res = infer(chain, chain["assets"], out, "--time_limit", "0.01")
    assert res.returncode == 0 and "time limit" in res.stderr
    result = json.loads(out.with_name("sub.csv.json").read_text())
    assert 1 <= result["checkpoints_used"] < result["checkpoints_listed"]
    valid_submission(out, chain["data"])


def test_unexpected_failure_still_writes_a_submission(chain, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(chain["data"], data, ignore=shutil.ignore_patterns("cache", "*.wav"))
    (data / "test_metadata.csv").write_text("filename,task\nx.wav,deletion\n")  # columns missing
    out = tmp_path / "sub.csv"
    res = infer(chain, chain["assets"], out, data=data, ok=False)
    assert res.returncode == 2 and "missing column" in res.stderr
    valid_submission(out, data)


def test_submission_zip_runs_offline_in_an_empty_folder(chain, tmp_path, no_network):
    zip_path = tmp_path / "submission.zip"
    run_script(chain["root"], "make_submission.py", "--assets", chain["assets"], "--out", zip_path)
    run_dir = tmp_path / "runtime"
    with zipfile.ZipFile(zip_path) as z:
        names = z.namelist()
        z.extractall(run_dir)
    assert "main.py" in names and "assets/model_configs.json" in names
    assert any(n.startswith("assets/vendor/espeakng_loader/espeak-ng-data/") for n in names)
    shutil.copytree(chain["data"], run_dir / "data", ignore=shutil.ignore_patterns("cache"))
    res = run_script(chain["root"], run_dir / "main.py", cwd=run_dir, env=no_network)
    assert res.returncode == 0
    assert f"espeak-ng from {run_dir}" in res.stderr, "the vendored TTS library is used"
    valid_submission(run_dir / "submission.csv", run_dir / "data")


def test_unseen_task_and_grade_fall_back_with_a_warning(chain, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(chain["data"], data, ignore=shutil.ignore_patterns("cache"))
    test = pd.read_csv(data / "test_metadata.csv", dtype=str)
    test.loc[0, "task"] = "digit_span"
    test.loc[1, "grade"] = "4"
    test.to_csv(data / "test_metadata.csv", index=False)
    out = tmp_path / "sub.csv"
    res = infer(chain, chain["assets"], out, data=data)
    assert res.returncode == 0
    first, second = test.loc[0, "filename"], test.loc[1, "filename"]
    assert f"row 2 ({first}): task='digit_span'" in res.stderr, "file, line and value of the unseen task"
    assert f"row 3 ({second}): grade='4'" in res.stderr, "file, line and value of the unseen grade"
    assert "grade outside" in res.stderr and f"row 3 ({second}): '4'" in res.stderr
    result = json.loads(out.with_name("sub.csv.json").read_text())
    assert result["fallback_rows"] == 0, "the model predicts them, with its 'unknown' task/grade"
    valid_submission(out, data)


def test_bad_rows_get_the_prior_and_every_other_row_a_prediction(chain, tmp_path):
    """One row with an empty expected_text and one unreadable clip cost those two rows, named,
    not the models: every other row gets the same prediction as with a clean test set."""
    clean_out = tmp_path / "clean.csv"
    infer(chain, chain["assets"], clean_out)
    clean = pd.read_csv(clean_out).set_index("filename")["score"]
    data = tmp_path / "data"
    shutil.copytree(chain["data"], data, ignore=shutil.ignore_patterns("cache"))
    test = pd.read_csv(data / "test_metadata.csv", dtype=str, keep_default_na=False)
    no_text, unreadable = test["filename"][0], test["filename"][1]
    test.loc[0, "expected_text"] = ""
    test.to_csv(data / "test_metadata.csv", index=False)
    (data / unreadable).write_bytes(b"RIFF....WAVEnot really")
    out = tmp_path / "sub.csv"
    res = infer(chain, chain["assets"], out, data=data)
    assert res.returncode == 0, "a bad row is not a failed run"
    result = json.loads(out.with_name("sub.csv.json").read_text())
    assert result["fallback_rows"] == 2 and set(result["fallback"]) == {no_text, unreadable}
    assert "empty expected_text" in result["fallback"][no_text]
    assert "cannot be decoded" in result["fallback"][unreadable]
    assert no_text in res.stderr and unreadable in res.stderr, "the bad rows are named"
    assert result["checkpoints_used"] == result["checkpoints_listed"], "no model was dropped"
    sub = valid_submission(out, data).set_index("filename")["score"]
    others = [f for f in sub.index if f not in (no_text, unreadable)]
    assert np.allclose(sub[others], clean[others], atol=1e-5), "the other rows: the models' predictions"
    priors = sub[[no_text, unreadable]]
    assert not np.allclose(priors, clean[[no_text, unreadable]], atol=1e-5), "the bad rows: the task prior"
