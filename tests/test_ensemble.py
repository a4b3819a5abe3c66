"""Ensemble weights, the config files, and safe loading of checkpoints and pickles."""
import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from readaloud.checkpoints import CheckpointError, atomic_save, safe_load
from readaloud.pipeline.ensemble import build_config, cross_fitted_logits, fit_weights, read_config, write_config
from readaloud.metrics import log_loss, sigmoid


def test_fit_weights_beats_each_member_and_is_non_negative():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 4000)
    signal = (2 * y - 1) * 1.0
    X = np.stack([signal + rng.normal(0, 1.5, y.size), signal + rng.normal(0, 1.5, y.size),
                  -signal + rng.normal(0, 3, y.size)], 1)  # an anti-correlated member gets weight 0
    w, b = fit_weights(X, y)
    assert (w >= 0).all() and w[2] < 1e-3
    ens = log_loss(y, sigmoid(X @ w + b))
    assert ens < min(log_loss(y, sigmoid(X[:, j])) for j in range(2))


def test_a_cross_fitted_blend_never_saw_the_clip_it_scores():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 600)
    signal = 2 * y - 1.0
    table = pd.DataFrame({"a": signal + rng.normal(0, 1.0, y.size), "b": signal + rng.normal(0, 2.0, y.size),
                          "score": y, "fold": np.arange(y.size) % 3})
    for blend in ("logit", "convex"):
        crossed = cross_fitted_logits(table, ["a", "b"], blend)
        flipped = table.assign(score=np.where(table["fold"] == 0, 1 - y, y))  # fold 0's labels reversed
        again = cross_fitted_logits(flipped, ["a", "b"], blend)
        held = (table["fold"] == 0).to_numpy()
        assert np.array_equal(crossed[held], again[held]), "fold 0's logits come from weights fitted without it"
        assert not np.allclose(crossed[~held], again[~held]), "the other folds' weights read fold 0's labels"
        if blend == "logit":  # fold 0's weights are those fitted on folds 1 and 2 alone
            w, b = fit_weights(table.loc[~held, ["a", "b"]].to_numpy(), y[~held])
            assert np.allclose(crossed[held], table.loc[held, ["a", "b"]].to_numpy() @ w + b)
    one_fold = table.assign(fold=0)
    w, b = fit_weights(one_fold[["a", "b"]].to_numpy(), y)
    assert np.allclose(cross_fitted_logits(one_fold, ["a", "b"], "logit"), one_fold[["a", "b"]].to_numpy() @ w + b)


def test_build_config_from_oof_files(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    for m, noise in (("modela", 1.0), ("modelb", 2.0)):
        for f in range(3):
            idx = np.arange(f, 300, 3)
            z = (2 * y[idx] - 1) + rng.normal(0, noise, idx.size)
            pd.DataFrame({"filename": [f"{i}.wav" for i in idx], "fold": f, "task": "t", "grade": "1",
                          "score": y[idx], "logit": z, "pred": sigmoid(z)}).to_csv(tmp_path / f"{m}_{f}_oof.csv", index=False)
            (tmp_path / f"{m}_{f}.pth").write_bytes(b"x")
            (tmp_path / f"{m}_{f}.json").write_text(json.dumps({"variant": m, "fold": f, "valid_logloss": float(f)}))
    cfg = build_config(tmp_path, max_folds=2)
    assert cfg["blend"] == "convex" and cfg["bias"] == 0.0, "stratified (or unknown) folds: convex"
    data = tmp_path / "data"
    (data / "cache").mkdir(parents=True)
    (data / "cache" / "folds_3.json").write_text(json.dumps({"fold_by": "voice", "n_folds": 3}))
    voice = build_config(tmp_path, data_dir=data)
    assert voice["blend"] == "logit" and voice["fold_by"] == "voice", "voice folds: the free blend"
    assert voice["oof_logloss"] <= cfg["oof_logloss"] + 1e-9
    cfg = build_config(tmp_path, max_folds=2, blend="logit")
    assert cfg["n_oof"] == 300 and cfg["oof_logloss"] <= min(cfg["oof_logloss_single"].values()) + 1e-9
    assert all(m["folds"] == [0, 1] for m in cfg["members"]), "the two best folds are shipped"
    write_config(cfg, tmp_path)
    assert read_config(tmp_path)["members"] == cfg["members"]
    (tmp_path / "model_configs.json").unlink()
    assert read_config(tmp_path)["bias"] == cfg["bias"], "plain-data pickle twin is readable"


class Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model_configs.pkl").write_bytes(pickle.dumps({"members": [Evil()]}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_config(tmp_path)
    assert not (tmp_path / "PWNED").exists()


def test_checkpoints_load_weights_only_and_broken_files_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    atomic_save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "ok.pth")
    assert torch.equal(safe_load(tmp_path / "ok.pth")["state_dict"]["w"], torch.ones(2))
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth: checkpoint is empty"):
        safe_load(tmp_path / "empty.pth", fix="retrain it")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth: cannot load"):
        safe_load(tmp_path / "cut.pth")
    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError):
        safe_load(tmp_path / "evil.pth")
    assert not (tmp_path / "PWNED").exists()


def test_an_ensemble_always_ships_at_least_one_model(tmp_path):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    for m in ("modela", "modelb"):  # both anti-correlated with the truth: no weight earned
        z = -(2 * y - 1) * 0.5 + rng.normal(0, 1.0, 200)
        pd.DataFrame({"filename": [f"{i}.wav" for i in range(200)], "fold": 0, "task": "t",
                      "grade": "1", "score": y, "logit": z, "pred": sigmoid(z)}).to_csv(tmp_path / f"{m}_0_oof.csv", index=False)
        (tmp_path / f"{m}_0.pth").write_bytes(b"x")
        (tmp_path / f"{m}_0.json").write_text(json.dumps({"variant": m, "fold": 0}))  # what says which fold it is
    cfg = build_config(tmp_path, blend="logit")
    assert len(cfg["members"]) == 1 and "note" in cfg["members"][0]
    assert cfg["oof_logloss"] <= cfg["oof_logloss_prior"] + 1e-6
    convex = build_config(tmp_path)  # the default blend
    assert convex["blend"] == "convex" and convex["bias"] == 0.0
    assert sum(m["weight"] for m in convex["members"]) == pytest.approx(1.0, abs=2e-3)


def test_convex_blend_cannot_sharpen():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 3000)
    X = np.stack([(2 * y - 1) * 0.3 + rng.normal(0, 0.5, y.size),
                  (2 * y - 1) * 0.3 + rng.normal(0, 0.5, y.size)], 1)  # under-confident members
    w_free, _ = fit_weights(X, y)
    from readaloud.pipeline.ensemble import fit_convex_weights
    w, b = fit_convex_weights(X, y)
    assert w_free.sum() > 1.5, "the free blend sharpens under-confident members"
    assert w.sum() == pytest.approx(1.0) and b == 0.0 and (w >= 0).all()
    assert log_loss(y, sigmoid(X @ w)) <= min(log_loss(y, sigmoid(X[:, j])) for j in range(2)) + 1e-9
