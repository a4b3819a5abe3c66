"""model5gbm: gradient boosting on alignment features as an ensemble member.

The exported trees predict exactly what scikit-learn does (missing values included) from a
checkpoint that loads with weights_only=True; the features are finite on real clips; a fold
trained through train.py writes the same files as a neural fold, joins get_config's ensemble
and infer.py's submission, and its bad clips and broken checkpoints are handled like theirs."""
import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_script
from readaloud.members.gbm.alignment import ACOUSTIC_NAMES, FEATURE_NAMES, acoustic_table, clip_features
from readaloud.checkpoints import CheckpointError, atomic_save, safe_load
from readaloud.config import RunConfig
from readaloud.members.gbm.gbm import TreeEnsemble, export_trees, fit_gbm, stopping_fold
from readaloud.metrics import logit, prior_predictions, sigmoid, task_priors

OOF_COLUMNS = ["filename", "fold", "task", "grade", "score", "logit", "fallback", "pred"]


def _roundtrip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as a checkpoint goes."""
    buf = io.BytesIO()
    torch.save({"state_dict": state}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)["state_dict"]


@pytest.mark.parametrize("leaves,min_leaf,early", [(15, 5, False), (4, 20, True), (31, 2, False)])
def test_exported_trees_match_sklearn_decision_function(leaves, min_leaf, early):
    from sklearn.ensemble import HistGradientBoostingClassifier
    rng = np.random.default_rng(leaves)
    n, d = 1500, 9
    X = rng.normal(size=(n, d))
    X[:, 2] = rng.integers(0, 4, n)                         # a code-like column
    X[rng.random((n, d)) < 0.15] = np.nan                    # missing values in training ...
    X[:, 5] = rng.normal(size=n)                             # ... but none in this column
    z = np.nan_to_num(X[:, 0]) + np.nan_to_num(X[:, 1]) * np.nan_to_num(X[:, 2]) - np.isnan(X[:, 3]) + X[:, 5]
    y = (z + rng.normal(size=n) > 0).astype(int)
    clf = HistGradientBoostingClassifier(max_iter=60, learning_rate=0.1, max_leaf_nodes=leaves,
                                         min_samples_leaf=min_leaf, early_stopping=early,
                                         random_state=0).fit(X, y)
    trees = TreeEnsemble(_roundtrip(export_trees(clf)), d)
    Xt = rng.normal(size=(3000, d)) * 2
    Xt[rng.random(Xt.shape) < 0.25] = np.nan                 # NaN everywhere, also where training had none
    Xt[:5] = np.nan
    Xt[5:10] = X[:5]
    got, want = trees.decision_function(Xt), clf.decision_function(Xt)
    assert trees.n_trees == clf.n_iter_ and np.abs(got - want).max() < 1e-6


def test_trees_stop_where_a_whole_training_fold_is_best_then_refit_on_every_row():
    """With folds that keep voices apart, the iteration count comes from one whole training fold
    (not a random clip split), and the final trees are fit on all training rows at that count."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    rng = np.random.default_rng(3)
    n = 900
    folds = np.repeat([0, 1, 2], n // 3)
    X = rng.normal(size=(n, 4))
    X[:, 3] = folds + rng.normal(scale=0.1, size=n)           # a "voice" feature that only fits seen folds
    y = ((X[:, 0] + 0.8 * (X[:, 3] > 1.5) * X[:, 1] + rng.normal(size=n)) > 0).astype(int)
    mc = RunConfig().model
    mc.gbm_max_iter, mc.gbm_learning_rate, mc.gbm_max_leaf_nodes, mc.gbm_min_samples_leaf = 200, 0.2, 8, 5
    assert stopping_fold(2, folds[folds != 2]) == 0 and stopping_fold(0, folds[folds != 0]) == 1
    stop = stopping_fold(1, folds)
    clf = fit_gbm(X, y, mc, seed=0, stop_folds=folds, stop_fold=stop)
    held = folds == stop
    inner = HistGradientBoostingClassifier(loss="log_loss", learning_rate=0.2, max_iter=200, max_leaf_nodes=8,
                                           min_samples_leaf=5, l2_regularization=mc.gbm_l2,
                                           early_stopping=False, random_state=0).fit(X[~held], y[~held])
    losses = [np.mean(np.logaddexp(0, d) - y[held] * d) for d in inner.staged_decision_function(X[held])]
    assert clf.n_iter_ == int(np.argmin(losses)) + 1 < 200
    full = HistGradientBoostingClassifier(loss="log_loss", learning_rate=0.2, max_iter=clf.n_iter_, max_leaf_nodes=8,
                                          min_samples_leaf=5, l2_regularization=mc.gbm_l2,
                                          early_stopping=False, random_state=0).fit(X, y)
    assert np.allclose(clf.decision_function(X), full.decision_function(X))
    # no folds given: the internal random split, as before
    assert fit_gbm(X, y, mc, seed=0).do_early_stopping_


def test_ear_copies_train_but_do_not_judge_when_the_trees_stop():
    """fit_gbm(copies=...): the stopping fold's loss is taken on its real clips only; the copies still
    train (the final fit sees every row). Here the copies carry label noise, so judging on them too
    would stop elsewhere."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    rng = np.random.default_rng(5)
    n = 900
    folds = np.repeat([0, 1, 2], n // 3)
    X = rng.normal(size=(n, 3))
    y = ((X[:, 0] + 0.5 * X[:, 1] + rng.normal(scale=0.7, size=n)) > 0).astype(int)
    copies = rng.random(n) < 0.5
    y[copies] = np.where(rng.random(copies.sum()) < 0.4, 1 - y[copies], y[copies])  # copies: noisy labels
    mc = RunConfig().model
    mc.gbm_max_iter, mc.gbm_learning_rate, mc.gbm_max_leaf_nodes, mc.gbm_min_samples_leaf = 150, 0.3, 8, 5
    stop = stopping_fold(1, folds)
    held = folds == stop
    inner = HistGradientBoostingClassifier(loss="log_loss", learning_rate=0.3, max_iter=150, max_leaf_nodes=8,
                                           min_samples_leaf=5, l2_regularization=mc.gbm_l2,
                                           early_stopping=False, random_state=0).fit(X[~held], y[~held])
    staged = list(inner.staged_decision_function(X))

    def best(rows):
        return int(np.argmin([np.mean(np.logaddexp(0, d[rows]) - y[rows] * d[rows]) for d in staged])) + 1
    clean, everything = best(held & ~copies), best(held)
    assert clean != everything, "the data must tell the two rules apart"
    clf = fit_gbm(X, y, mc, seed=0, stop_folds=folds, stop_fold=stop, copies=copies)
    assert clf.n_iter_ == clean
    assert fit_gbm(X, y, mc, seed=0, stop_folds=folds, stop_fold=stop).n_iter_ == everything
    full = HistGradientBoostingClassifier(loss="log_loss", learning_rate=0.3, max_iter=clean, max_leaf_nodes=8,
                                          min_samples_leaf=5, l2_regularization=mc.gbm_l2,
                                          early_stopping=False, random_state=0).fit(X, y)
    assert np.allclose(clf.decision_function(X), full.decision_function(X)), "the copies train"


def test_tree_ensemble_refuses_broken_arrays():
    from sklearn.ensemble import HistGradientBoostingClassifier
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 3))
    clf = HistGradientBoostingClassifier(max_iter=5, early_stopping=False).fit(X, X[:, 0] > 0)
    state = export_trees(clf)
    bad = dict(state, left=state["left"] + 10_000)
    with pytest.raises(CheckpointError, match="outside"):
        TreeEnsemble(bad, 3)
    with pytest.raises(CheckpointError):
        TreeEnsemble({k: v for k, v in state.items() if k != "value"}, 3)
    with pytest.raises(CheckpointError, match="feature"):
        TreeEnsemble(state, 0)


def test_alignment_of_a_reference_with_itself_is_a_perfect_diagonal():
    rng = np.random.default_rng(1)
    t = np.arange(200)
    speech = (np.sin(t / 9.0) > -0.3)[:, None]               # bursts and pauses
    ref = np.where(speech, rng.normal(0.3, 0.25, (200, 80)), -0.4).astype(np.float16)
    f = dict(zip(ACOUSTIC_NAMES, clip_features(ref, ref, "one two three")))
    assert f["dtw_cost"] < 1e-6 and f["dtw_diag_frac"] == 1.0 and f["sub_ref_span"] == 1.0
    assert f["speech_ratio"] == 1.0 and f["segs_diff_ref"] == 0 and f["n_words"] == 3
    longer = np.concatenate([ref, ref])                       # the whole text said twice: an insertion
    g = dict(zip(ACOUSTIC_NAMES, clip_features(longer, ref, "one two three")))
    assert g["sub_ref_in_resp"] < 0.05 < g["dtw_cost_rel"] and g["sub_resp_span"] <= 0.55
    assert g["speech_ratio"] == pytest.approx(2.0, rel=0.05) and g["resp_segs"] > f["resp_segs"]


@pytest.fixture(scope="module")
def gbm(chain, tmp_path_factory):
    """The chain's data, references and trained neural folds copied (so nothing here touches the
    shared fixture), then model5gbm trained on its 2 folds through train.py."""
    base = tmp_path_factory.mktemp("gbm")
    for key in ("data", "tts", "assets"):
        shutil.copytree(chain[key], base / key)
    data, assets, tts = base / "data", base / "assets", base / "tts"
    for p in assets.glob("model_configs.*"):
        p.unlink()
    out = run_script(chain["root"], "train.py", "--data", data, "--assets", assets, "--tts_dir", tts,
                     "--n_folds", 2, "--models", "model5gbm", "--jobs", 2,
                     "--gbm_min_samples_leaf", 4)  # 24 training clips: let the trees split all the same
    return {"root": chain["root"], "data": data, "assets": assets, "tts": tts, "base": base, "train_out": out.stdout}


def test_features_are_finite_on_real_clips(gbm):
    from readaloud.features import FeatureParams
    from readaloud.prep.prepare import ensure_clip_features, ensure_references
    meta = pd.read_csv(gbm["data"] / "train_metadata.csv", dtype=str).head(8)
    refs = ensure_references(gbm["tts"], RunConfig().tts, meta["expected_text"].unique(), FeatureParams(),
                             progress=False)
    clips, _ = ensure_clip_features(gbm["data"], meta["filename"].tolist(), progress=False)
    X, ok = acoustic_table(meta, clips, refs)
    assert X.shape == (8, len(ACOUSTIC_NAMES)) and ok.all()
    assert np.isfinite(X).all(), [n for n, bad in zip(ACOUSTIC_NAMES, ~np.isfinite(X).all(0)) if bad]


def test_alignment_features_are_cached_once_per_clip(gbm, tmp_path, monkeypatch, caplog):
    """train.py computed the table before its jobs; reading it back gives the same numbers, and a
    damaged cache is recomputed, never trusted."""
    from readaloud.members.gbm import alignment
    from readaloud.features import FeatureParams
    from readaloud.prep.prepare import ensure_clip_features, ensure_references
    meta = pd.read_csv(gbm["data"] / "train_metadata.csv", dtype=str)
    refs = ensure_references(gbm["tts"], RunConfig().tts, meta["expected_text"].unique(), FeatureParams(),
                             progress=False)
    clips, _ = ensure_clip_features(gbm["data"], meta["filename"].tolist(), progress=False)
    cache = alignment.alignment_cache_path(gbm["data"], refs)
    assert cache.exists(), "train.py fills the cache before starting gbm folds"
    fresh = acoustic_table(meta, clips, refs)

    def no_compute(*a):
        raise AssertionError("a cached row was computed again")
    with monkeypatch.context() as m:
        m.setattr(alignment, "clip_features", no_compute)
        cached = acoustic_table(meta, clips, refs, cache)
    assert np.array_equal(cached[0], fresh[0], equal_nan=True) and np.array_equal(cached[1], fresh[1])

    copy = tmp_path / cache.name
    acoustic_table(meta.head(3), clips, refs, copy)
    acoustic_table(meta.iloc[3:5], clips, refs, copy)
    with np.load(copy, allow_pickle=False) as z:
        assert len(z["keys"]) == 5, "a second call adds its rows to the first's"
    copy.write_bytes(b"not an npz")
    with caplog.at_level("WARNING", logger="readaloud"):
        again = acoustic_table(meta.head(3), clips, refs, copy)
    assert "unreadable" in caplog.text and np.array_equal(again[0], fresh[0][:3], equal_nan=True)


def test_gbm_folds_write_what_a_neural_fold_writes(gbm):
    assert "2/2 folds finished" in gbm["train_out"]
    assets = gbm["assets"]
    meta = pd.read_csv(gbm["data"] / "train_metadata.csv", dtype=str)
    oofs = []
    for fold in (0, 1):
        stem = f"model5gbm_{fold}"
        ck = safe_load(assets / f"{stem}.pth")                 # weights_only=True: no pickled sklearn
        assert ck["arch"] == "gbm" and ck["variant"] == "model5gbm" and ck["fold"] == fold
        assert ck["feature_names"] == FEATURE_NAMES and all(torch.is_tensor(v) for v in ck["state_dict"].values())
        TreeEnsemble(ck["state_dict"], len(FEATURE_NAMES))
        oof = pd.read_csv(assets / f"{stem}_oof.csv", dtype={"filename": str, "grade": str})
        assert list(oof.columns) == OOF_COLUMNS and (oof["fold"] == fold).all()
        assert np.allclose(oof["pred"], sigmoid(oof["logit"])) and oof["pred"].between(0, 1).all()
        summary = json.loads((assets / f"{stem}.json").read_text())
        for key in ("valid_logloss", "valid_logloss_prior", "n_train", "n_valid", "config", "environment",
                    "skipped_clips"):
            assert key in summary, key
        assert summary["n_valid"] == len(oof) and summary["config"]["model"]["arch"] == "gbm"
        run_dir = assets / "runs" / stem
        assert (run_dir / "config.json").exists() and (run_dir / "train.log").exists()
        oofs.append(oof)
    assert sorted(pd.concat(oofs)["filename"]) == sorted(meta["filename"]), "OOF covers every clip once"


def test_finished_fold_is_skipped_unless_forced(gbm):
    root, ck = gbm["root"], gbm["assets"] / "model5gbm_0.pth"
    args = ["train_model5gbm.py", "--fold", 0, "--n_folds", 2, "--data", gbm["data"], "--assets", gbm["assets"],
            "--tts_dir", gbm["tts"], "--no_progress", "--quiet"]
    before = ck.stat().st_mtime_ns
    assert "already trained" in run_script(root, *args).stdout and ck.stat().st_mtime_ns == before
    run_script(root, *args, "--force")
    assert ck.stat().st_mtime_ns != before
    check = run_script(root, "check_models.py", "--data", gbm["data"], "--assets", gbm["assets"], "--n_folds", 2,
                       "--models", "model5gbm")
    assert "all folds OK" in check.stdout


def test_bad_clip_gets_the_task_prior(gbm, tmp_path, monkeypatch):
    """A clip that cannot be decoded is left out of training and gets its task's prior in the
    OOF file with fallback=1, as in a neural fold."""
    import readaloud.pipeline.fold_run as fold_run
    import readaloud.prep.prepare as prepare
    from readaloud.pipeline.fold_run import run_fold
    meta = pd.read_csv(gbm["data"] / "train_metadata.csv", dtype=str)
    folds = pd.read_csv(gbm["data"] / "cache" / "folds_2.csv", dtype={"filename": str})
    broken = folds.loc[folds["fold"] == 1, "filename"].iloc[0]
    real = prepare.ensure_clip_features

    class Without:
        def __init__(self, store):
            self.store = store

        def __contains__(self, key):
            return key != broken and key in self.store

        def __getattr__(self, name):
            return getattr(self.store, name)

    def fake(data_dir, filenames, *a, **k):
        store, bad = real(data_dir, filenames, *a, **k)
        return Without(store), {**bad, broken: "unreadable (test)"}

    monkeypatch.setattr(fold_run, "ensure_clip_features", fake)  # where the shared loader looks it up
    summary = run_fold("model5gbm", 1, gbm["data"], tmp_path, gbm["tts"], quiet=True, progress=False)
    assert summary["skipped_clips"] == [broken]
    oof = pd.read_csv(tmp_path / "model5gbm_1_oof.csv", dtype={"filename": str, "grade": str})
    row = oof.set_index("filename").loc[broken]
    labels = pd.read_csv(gbm["data"] / "train_labels.csv", dtype={"filename": str})
    full = meta.merge(labels, on="filename").merge(folds, on="filename")
    prior = prior_predictions(task_priors(full[full["fold"] != 1]), [row["task"]])
    assert row["fallback"] == 1 and row["logit"] == pytest.approx(float(logit(prior)[0]))
    assert oof.loc[oof["filename"] != broken, "fallback"].eq(0).all()


def test_get_config_takes_gbm_into_the_ensemble(gbm):
    out = run_script(gbm["root"], "get_config.py", "--assets", gbm["assets"]).stdout
    config = json.loads((gbm["assets"] / "model_configs.json").read_text())
    assert "model5gbm" in config["oof_logloss_single"] and "model1mean" in config["oof_logloss_single"]
    assert config["n_oof"] == len(pd.read_csv(gbm["data"] / "train_metadata.csv")), out


def _infer(gbm, config: dict, out_name: str) -> dict:
    (gbm["assets"] / "model_configs.json").write_text(json.dumps(config))
    out = gbm["base"] / out_name
    res = run_script(gbm["root"], "infer.py", "--data", gbm["data"], "--assets", gbm["assets"], "--tts_dir",
                     gbm["tts"], "--out", out, "--no_progress")
    sub = pd.read_csv(out, dtype={"filename": str})
    fmt = pd.read_csv(gbm["data"] / "submission_format.csv", dtype={"filename": str})
    assert sub["filename"].tolist() == fmt["filename"].tolist(), "same rows, same order"
    assert np.isfinite(sub["score"]).all() and ((sub["score"] > 0) & (sub["score"] < 1)).all()
    assert "test log loss" in res.stdout
    return json.loads(out.with_name(out.name + ".json").read_text())


def test_infer_with_gbm_alone_and_in_a_blend(gbm):
    from readaloud.pipeline.ensemble import build_config
    alone = build_config(gbm["assets"], ["model5gbm"])
    assert [m["model"] for m in alone["members"]] == ["model5gbm"]
    res = _infer(gbm, alone, "sub_gbm.csv")
    assert res["models_used"] == ["model5gbm"] and res["checkpoints_used"] == 2 and res["fallback_rows"] == 0
    blend = {"members": [{"model": "model5gbm", "weight": 0.5, "checkpoints": ["model5gbm_0.pth", "model5gbm_1.pth"]},
                         {"model": "model1mean", "weight": 0.5, "checkpoints": ["model1mean_0.pth", "model1mean_1.pth"]}],
             "bias": 0.0, "n_folds": 2}
    res = _infer(gbm, blend, "sub_blend.csv")
    assert res["models_used"] == ["model1mean", "model5gbm"] and res["checkpoints_used"] == 4


def test_broken_gbm_checkpoint_is_dropped(gbm):
    assets = gbm["assets"]
    good = safe_load(assets / "model5gbm_1.pth")
    (assets / "model5gbm_9.pth").write_bytes(b"not a checkpoint")
    atomic_save({**good, "state_dict": {k: v for k, v in good["state_dict"].items() if k != "value"}},
                assets / "model5gbm_8.pth")
    config = {"members": [{"model": "model5gbm", "weight": 1.0,
                           "checkpoints": ["model5gbm_0.pth", "model5gbm_9.pth", "model5gbm_8.pth"]}],
              "bias": 0.0, "n_folds": 2}
    try:
        res = _infer(gbm, config, "sub_broken.csv")
    finally:
        for f in (8, 9):
            (assets / f"model5gbm_{f}.pth").unlink()
    assert res["checkpoints_used"] == 1 and res["checkpoints_listed"] == 3


def test_a_column_without_values_is_left_out_of_the_fit_and_the_checkpoint():
    """scikit-learn cannot bin a column that is NaN in every training row (the prompted block of a set
    whose every task has too many words for a prompt); drop_empty_columns leaves it out, the trees fit
    on the rest, and GBMModel scores a full-layout table through the names the checkpoint keeps."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from readaloud.config import ModelConfig
    from readaloud.members.gbm.gbm import FeatureLayout, GBMModel, drop_empty_columns
    rng = np.random.default_rng(0)
    layout = FeatureLayout(alignment=False, asr_backbones=())
    names = layout.names
    X = rng.normal(size=(300, len(names)))
    X[:, 1] = np.nan
    y = (X[:, 0] > 0).astype(int)
    with pytest.raises(ValueError):
        HistGradientBoostingClassifier(max_iter=5).fit(X, y)
    X_all, X_fit, kept = drop_empty_columns(X, X[:200], names, "test")
    assert kept == names[:1] + names[2:] and X_fit.shape == (200, len(names) - 1) and X_all.shape[1] == len(kept)
    clf = fit_gbm(X_fit, y[:200], ModelConfig(arch="gbm", gbm_max_iter=20, gbm_min_samples_leaf=5), 0)
    model = GBMModel({"feature_names": kept, "state_dict": _roundtrip(export_trees(clf)), "tasks": ["t"]}, layout)
    np.testing.assert_allclose(model.trees.decision_function(X[200:][:, model.columns]),
                               clf.decision_function(X_all[200:]), atol=1e-6)
    same = drop_empty_columns(X_all, X_fit, kept, "test")
    assert same[2] == kept and same[1] is X_fit
