"""The whole chain on a tiny demo set, as a user runs it: data -> preprocess -> train.py
(two models x two folds, one epoch, two parallel jobs) -> check_models -> get_config -> infer."""
import json

import numpy as np
import pandas as pd

from conftest import run_script


def run(root, *args, ok=True):
    return run_script(root, *args, ok=ok)


def test_every_fold_wrote_weights_and_oof(chain):
    meta = pd.read_csv(chain["data"] / "train_metadata.csv")
    for model in ("model1mean", "model3mapd"):
        oofs = []
        for fold in (0, 1):
            assert (chain["assets"] / f"{model}_{fold}.pth").stat().st_size > 0
            oof = pd.read_csv(chain["assets"] / f"{model}_{fold}_oof.csv")
            assert (oof["fold"] == fold).all() and oof["pred"].between(0, 1).all()
            oofs.append(oof)
        assert sorted(pd.concat(oofs)["filename"]) == sorted(meta["filename"]), "OOF covers every clip once"


def test_rerun_skips_finished_folds(chain):
    out = run(chain["root"], "train.py", "--data", chain["data"], "--assets", chain["assets"], "--tts_dir",
              chain["tts"], "--n_folds", 2, "--models", "model1mean", "--jobs", 1, "--epochs", 1).stdout
    assert out.count("finished already, skipped") == 2


def test_check_get_config_and_infer(chain):
    root, data, assets, tts = chain["root"], chain["data"], chain["assets"], chain["tts"]
    check = run(root, "check_models.py", "--data", data, "--assets", assets, "--n_folds", 2, ok=False)
    assert "model1mean" in check.stdout and "model3mapd" in check.stdout and "OOF" in check.stdout
    cfg = chain["config_out"]
    assert "ensemble" in cfg and (assets / "model_configs.json").exists() and (assets / "model_configs.pkl").exists()
    config = json.loads((assets / "model_configs.json").read_text())
    assert all(m["weight"] >= 0 for m in config["members"])
    out = tmp = data.parent / "submission.csv"
    res = run(root, "infer.py", "--data", data, "--assets", assets, "--tts_dir", tts, "--out", out, "--no_progress")
    assert "test log loss" in res.stdout
    sub = pd.read_csv(out)
    fmt = pd.read_csv(data / "submission_format.csv")
    assert list(sub.columns) == ["filename", "score"]
    assert sub["filename"].tolist() == fmt["filename"].tolist(), "same rows, same order"
    assert np.isfinite(sub["score"]).all() and ((sub["score"] > 0) & (sub["score"] < 1)).all()
    assert tmp.with_name("submission.csv.json").exists()


def test_preprocess_rerun_synthesizes_and_decodes_nothing_new(chain):
    tts_files = {p: p.stat().st_mtime_ns for p in chain["tts"].rglob("*") if p.is_file()}
    out = run(chain["root"], "preprocess.py", "--data", chain["data"], "--tts_dir", chain["tts"], "--n_folds", 2,
              "--workers", 1)
    assert "synthesized" not in out.stdout + out.stderr and "features" not in out.stderr
    assert {p: p.stat().st_mtime_ns for p in tts_files} == tts_files, "the TTS cache was not rewritten"
    index = (chain["tts"] / "espeak_en-us+f3" / "index.csv").read_text().splitlines()
    meta = __import__("pandas").read_csv(chain["data"] / "train_metadata.csv")
    assert len(index) - 1 >= meta["expected_text"].nunique(), "one reference per unique text"


def test_after_preprocess_no_step_needs_the_fold_count(chain):
    """preprocess.py --n_folds 2 wrote the fold file: train, check_models, get_config and infer
    read the count from it and find nothing missing (no folds 2-5 of a six-fold default)."""
    root, data, assets, tts = chain["root"], chain["data"], chain["assets"], chain["tts"]
    common = ["--data", data, "--assets", assets, "--tts_dir", tts]
    train = run(root, "train.py", *common, "--models", "model1mean,model3mapd", "--jobs", 1)
    assert train.stdout.count("finished already, skipped") == 4 and "4/4 folds finished" in train.stdout
    check = run(root, "check_models.py", *common)
    assert "all folds OK" in check.stdout and "missing" not in check.stdout
    assert check.stdout.splitlines()[0].split() == ["model", "fold", "0", "fold", "1", "OOF"]
    config = run(root, "get_config.py", "--data", data, "--assets", assets)
    assert "wrote" in config.stdout
    out = data.parent / "submission_no_fold_count.csv"
    res = run(root, "infer.py", *common, "--out", out, "--no_progress")
    assert "test log loss" in res.stdout and "0 prior fallbacks" in res.stdout
    wrong = run(root, "check_models.py", *common, "--n_folds", 6, ok=False)
    assert wrong.returncode == 2 and "--n_folds 6 disagrees with the fold file" in wrong.stderr
