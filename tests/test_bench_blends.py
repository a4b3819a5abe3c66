"""bench/blends.py: blend rules refitted on a finished run's OOF and scored on its saved test predictions."""
import json

import numpy as np
import pandas as pd
import pytest

from readaloud.bench import blends
from readaloud.metrics import log_loss, sigmoid


def _underconfident(rng, n):
    """Two members that each see half the evidence: the truth's logit is the sum of theirs."""
    z1, z2 = rng.normal(0, 1.5, n), rng.normal(0, 1.5, n)
    y = (rng.random(n) < sigmoid(z1 + z2)).astype(float)
    return np.stack([z1, z2], 1), y


def test_capped_weights_never_sharpen_while_the_free_blend_does():
    X, y = _underconfident(np.random.default_rng(0), 4000)
    w_free, _ = blends.RULES["logit"](X, y)
    w_cap, b_cap = blends.RULES["capped"](X, y)
    assert w_free.sum() > 1.5  # the free blend learns that the evidence adds up
    assert w_cap.sum() <= 1.0 + 1e-6 and (w_cap >= 0).all()
    shifted_y = (np.random.default_rng(1).random(4000) < sigmoid(0.5 * X.sum(1) + 1.0)).astype(float)
    _, b_shift = blends.RULES["capped"](X, shifted_y)
    assert b_shift > 0.5  # the bias stays free: a base-rate shift is still learnt
    w_mean, b_mean = blends.RULES["mean"](X, y)
    assert np.allclose(w_mean, 0.5) and b_mean == 0.0


def _fake_run(root, rng, speakers=("a", "b")):
    """A LOSO-shaped folder: heldout_<S>/ with assets (fold summaries, OOF), test labels and predictions."""
    for s in speakers:
        folder, data, assets = root / f"heldout_{s}", root / f"heldout_{s}" / "data", root / f"heldout_{s}" / "assets"
        for d in (data, assets):
            d.mkdir(parents=True)
        X, y = _underconfident(rng, 300)
        Xt, yt = _underconfident(rng, 100)
        names = [f"test_{i}.wav" for i in range(100)]
        pd.DataFrame({"filename": names, "score": yt.astype(int)}).to_csv(data / "test_labels.csv", index=False)
        preds = {}
        for j, m in enumerate(("m1", "m2")):
            for fold in range(3):
                rows = np.arange(300) % 3 == fold
                (assets / f"{m}_{fold}.json").write_text(json.dumps({"variant": m, "fold": fold}))
                (assets / f"{m}_{fold}.pth").write_bytes(b"")
                pd.DataFrame({"filename": [f"tr_{i}.wav" for i in np.flatnonzero(rows)], "fold": fold,
                              "task": "t", "grade": "1", "score": y[rows], "logit": X[rows, j]}
                             ).to_csv(assets / f"{m}_{fold}_oof.csv", index=False)
            preds[m] = str(folder / f"test_{m}.csv")
            pd.DataFrame({"filename": names[::-1], "score": sigmoid(Xt[::-1, j])}).to_csv(preds[m], index=False)
        (folder / "summary.json").write_text(json.dumps({
            "data": str(data), "assets": str(assets), "predictions": {**preds, "ensemble": "x"},
            "test_logloss": {m: {"overall": log_loss(yt, sigmoid(Xt[:, j]))} for j, m in enumerate(("m1", "m2"))}
            | {"ensemble": {"overall": 0.5}}}))
    return root


def test_a_refitted_blend_is_scored_on_the_saved_test_predictions_in_label_order(tmp_path):
    run = _fake_run(tmp_path / "run", np.random.default_rng(2))
    folder = run / "heldout_a"
    res = blends.evaluate(folder, ["m1", "m2"], "logit")
    oof = pd.concat([pd.read_csv(p) for p in sorted((folder / "assets").glob("m1_*_oof.csv"))])
    oof2 = pd.concat([pd.read_csv(p) for p in sorted((folder / "assets").glob("m2_*_oof.csv"))])
    X = oof[["filename", "score", "logit"]].merge(oof2[["filename", "logit"]], on="filename")
    w, b = blends.RULES["logit"](X[["logit_x", "logit_y"]].to_numpy(), X["score"].to_numpy())
    labels = pd.read_csv(folder / "data" / "test_labels.csv")
    z = sum(wj * pd.read_csv(folder / f"test_{m}.csv").set_index("filename").loc[labels.filename, "score"]
            .pipe(lambda p: np.log(p / (1 - p))).to_numpy() for wj, m in zip(w, ("m1", "m2")))
    assert res["test_logloss"] == pytest.approx(log_loss(labels.score.to_numpy(), sigmoid(z + b)), abs=1e-6)
    assert sum(res["weights"].values()) > 1.2
    assert blends.evaluate(folder, ["m1", "m3"], "logit") is None  # a member the run never trained


def test_the_report_has_every_subset_and_rule_per_speaker(tmp_path):
    run = _fake_run(tmp_path / "run", np.random.default_rng(3))
    report = blends.main(["--runs", str(run), "--out", str(tmp_path / "out"), "--rules", "logit,capped"])
    assert set(report[str(run)]) == {"m1+m2 / logit", "m1+m2 / capped"}
    assert set(report[str(run)]["m1+m2 / capped"]) == {"a", "b"}
    md = (tmp_path / "out" / "blends.md").read_text()
    assert "| m1+m2 | capped |" in md and "| ensemble | (benchmark) |" in md
    with pytest.raises(SystemExit, match="unknown rule"):
        blends.main(["--runs", str(run), "--out", str(tmp_path / "o2"), "--rules", "nope"])
