"""The log-loss decomposition: its parts add up, what calibration can fix is told apart from what it
cannot, and the recalibrated floor is what the best monotone map reaches."""
import numpy as np
import pytest

from readaloud.metrics import EPS, log_loss, log_loss_decomposition


def test_parts_add_up_and_are_not_negative():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 150)
        p = np.clip(0.5 * y + rng.normal(0.25, 0.3, 150), 0, 1)
        d = log_loss_decomposition(y, p)
        assert d["logloss"] == pytest.approx(log_loss(y, p))
        assert d["miscalibration"] - d["discrimination"] + d["uncertainty"] == pytest.approx(d["logloss"])
        assert d["miscalibration"] >= -1e-12 and d["discrimination"] >= -1e-12
        assert d["recalibrated"] <= min(d["logloss"], d["uncertainty"]) + 1e-12


def test_a_well_ranked_but_timid_score_is_all_miscalibration():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.40, 0.42, 0.45, 0.55, 0.58, 0.60])   # perfect ranking, far from sure
    d = log_loss_decomposition(y, p)
    assert d["recalibrated"] == pytest.approx(-np.log(1 - EPS))   # the best map says 0 / 1, clipped
    assert d["discrimination"] == pytest.approx(np.log(2) + np.log(1 - EPS))
    assert d["miscalibration"] == pytest.approx(d["logloss"] - d["recalibrated"])
    assert d["miscalibration"] > 0.5


def test_a_calibrated_score_has_nothing_to_recalibrate():
    # two score levels whose observed rates are the scores themselves
    y = np.array([0, 0, 0, 1] + [0, 1, 1, 1])
    p = np.array([0.25] * 4 + [0.75] * 4)
    d = log_loss_decomposition(y, p)
    assert d["miscalibration"] == pytest.approx(0.0, abs=1e-12)
    assert d["recalibrated"] == pytest.approx(d["logloss"])


def test_scores_that_rank_nothing_discriminate_nothing():
    y = np.array([1, 0, 1, 0, 1, 0])
    for p in (np.full(6, 0.9), np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.7])):   # ties; ranked backwards
        d = log_loss_decomposition(y, p)
        assert d["discrimination"] == pytest.approx(0.0, abs=1e-12)
        assert d["recalibrated"] == pytest.approx(d["uncertainty"]) == pytest.approx(np.log(2))


def test_tied_scores_get_one_recalibrated_value():
    # a map of the score cannot tell tied clips apart: the 0.5s are pooled, not sorted by label
    y = np.array([0, 1, 0, 1])
    p = np.array([0.5, 0.5, 0.5, 0.5])
    assert log_loss_decomposition(y, p)["recalibrated"] == pytest.approx(np.log(2))


def test_no_clips_gives_nan():
    d = log_loss_decomposition([], [])
    assert all(np.isnan(v) for v in d.values())
