"""The hearing-gate benchmark: a gate that carries information is learned across folds, and the
report reads a children's run (OOF files, speakers, both Whispers' cached decodes)."""
import json

import numpy as np
import pandas as pd
import pytest

from readaloud.bench import hearing_gates
from readaloud.members.gbm.evidence import ASR_VERSION, AsrCache, ClipDecode, add_to_asr_cache
from readaloud.metrics import log_loss, sigmoid


def test_a_gate_that_matters_is_learned_out_of_fold():
    """The member's logit is right where h is high and noise where h is low: the gated blend,
    fitted without each fold, shrinks the noisy clips and beats the plain blend on held-out folds."""
    rng = np.random.default_rng(0)
    n = 4000
    y = rng.integers(0, 2, n)
    h = rng.uniform(-1, 1, n)
    logit = np.where(h > 0, 3 * (2 * y - 1), 3 * rng.choice([-1, 1], n))
    X, Z, folds = logit[:, None].astype(float), h[:, None], np.arange(n) % 4
    plain = hearing_gates.cross_fitted_gated(X, y, np.zeros((n, 0)), folds)
    gated = hearing_gates.cross_fitted_gated(X, y, Z, folds)
    assert log_loss(y, sigmoid(gated)) < log_loss(y, sigmoid(plain)) - 0.05
    noisy = h < -0.5
    assert np.abs(gated[noisy]).mean() < np.abs(plain[noisy]).mean(), "unheard clips pulled towards the bias"


def test_report_on_a_small_run(tmp_path, monkeypatch):
    from readaloud.pipeline import ensemble
    rng = np.random.default_rng(1)
    n = 48
    names = [f"c{i}.wav" for i in range(n)]
    y = rng.integers(0, 2, n)
    rows = pd.DataFrame({"filename": names, "fold": np.arange(n) % 4, "task": "sentence_repetition", "grade": "1",
                         "score": y})
    oofs = {m: rows.assign(logit=(2 * y - 1) * s + rng.normal(0, 1, n)) for m, s in (("a", 2.0), ("b", 1.0))}
    monkeypatch.setattr(ensemble, "collect_oof", lambda assets: oofs)
    data = tmp_path / "run" / "data"
    (data / "cache").mkdir(parents=True)
    speakers = [f"k{i % 6}" if i < 36 else "adult" for i in range(n)]
    pd.DataFrame({"filename": names, "speaker": speakers, "change": np.where(y == 1, "own", "swap")}).to_csv(
        data / "speakers.csv", index=False)
    for tag in ("tiny.en", "base"):
        clips = {f: ClipDecode("the cat sat" if i % 3 or tag == "base" else "a dog", [1, 2],
                               {"gen_avg_logprob": -0.1 * (i % 7), "no_speech_prob": 0.01, "tr_mean_logp": -0.2,
                                "tr_sum_logp": -1.0}) for i, f in enumerate(names)}
        add_to_asr_cache(data / "cache" / f"asr_v{ASR_VERSION}_whisper-{tag}_x_int8_y.npz", AsrCache(clips=clips))
    source = tmp_path / "source"
    source.mkdir()
    pd.DataFrame({"utt": range(6), "speaker": [f"k{i}" for i in range(6)], "age": 7, "gender": "f",
                  "text": "X"}).to_csv(source / "utterances.csv", index=False)
    results = hearing_gates.main(["--run", str(tmp_path / "run"), "--source", str(source)])
    assert set(results) == set(hearing_gates.GATES)
    assert all(r["n_children"] == 6 for r in results.values()), "the adult speaker is not a child to score"
    md = (tmp_path / "run" / "hearing_gates.md").read_text()
    assert "| none (today's blend) |" in md and "| agree_word |" in md
    assert json.loads((tmp_path / "run" / "hearing_gates.json").read_text()).keys() == results.keys()
    signals = hearing_gates.hearing_signals(pd.DataFrame({"filename": names, "a": 0.0, "b": 1.0}), data, ["a", "b"])
    assert signals["agree_word"].iloc[0] == pytest.approx(1.5), "a dog -> the cat sat: 3 edits of 2 words"
    assert signals["agree_word"].iloc[1] == 0.0 and signals["unplaced"].iloc[1] == 0.0
    assert (signals["member_gap"] == 1.0).all()
