"""--text_negatives: a clip read right, paired with a text the child did not say, scored 0; made for
a fold's training rows only, the same for the same seed whatever the rows' order."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from readaloud.config import ConfigError, RunConfig
from readaloud.prep.text_negatives import SOURCE_COLUMN, changed_text, with_text_negatives


def rows() -> pd.DataFrame:
    return pd.DataFrame({
        "filename": ["a.wav", "b.wav", "c.wav", "d.wav", "e.wav", "f.wav"],
        "task": ["sentence_repetition"] * 3 + ["deletion"] * 3,
        "expected_text": ["the cat sat down", "a dog ran home", "the sun is hot", "boy", "cat", "top"],
        "grade": ["1"] * 6,
        "score": [1, 0, 1, 1, 0, 1],
        "fold": [0, 1, 1, 0, 1, 0],
    })


def test_made_rows_are_changed_texts_of_the_rows_scored_1():
    base = rows()
    out = with_text_negatives(base, 2, seed=0)
    assert out.iloc[: len(base)].drop(columns=SOURCE_COLUMN).equals(base), "the real rows come first, unchanged"
    made = out.iloc[len(base):]
    assert len(made) == 2 * int((base["score"] == 1).sum())
    assert (made["score"] == 0).all()
    assert set(made["filename"]) == set(base.loc[base["score"] == 1, "filename"])
    for _, r in made.iterrows():
        source = base.set_index("filename").loc[r["filename"]]
        assert r[SOURCE_COLUMN] == source["expected_text"] and r["task"] == source["task"]
        assert r["expected_text"].lower() != source["expected_text"].lower()
        if r["task"] == "deletion":   # a one-word answer becomes another answer of its task
            assert r["expected_text"] in {"boy", "cat", "top"}
        else:                          # one word swapped, dropped or added, from the task's words
            old, new = source["expected_text"].split(), r["expected_text"].split()
            assert abs(len(old) - len(new)) <= 1
            pool = {w for t in base.loc[base["task"] == r["task"], "expected_text"] for w in t.split()}
            assert set(new) <= pool
    assert out.loc[: len(base) - 1, SOURCE_COLUMN].isna().all()
    two_of_a = made.loc[made["filename"] == "a.wav", "expected_text"]
    assert two_of_a.nunique() == 2, "a row's made texts differ from each other"


def test_the_same_seed_makes_the_same_rows_whatever_the_order():
    base = rows()
    a = with_text_negatives(base, 1, seed=3)
    b = with_text_negatives(base.iloc[::-1].reset_index(drop=True), 1, seed=3)
    key = ["filename", "expected_text"]
    made_a = a[a[SOURCE_COLUMN].notna()].sort_values(key)[key].reset_index(drop=True)
    made_b = b[b[SOURCE_COLUMN].notna()].sort_values(key)[key].reset_index(drop=True)
    assert made_a.equals(made_b)
    other_seed = with_text_negatives(base, 1, seed=4)
    assert not other_seed.iloc[len(base):]["expected_text"].tolist() == a.iloc[len(base):]["expected_text"].tolist()


def test_nothing_is_made_when_there_is_nothing_else_to_say():
    rng = np.random.default_rng(0)
    assert changed_text("boy", ["boy"], ["boy"], rng) is None
    assert with_text_negatives(rows(), 0, seed=0).equals(rows())
    lone = rows().iloc[[3]]   # the only deletion answer in its pool
    assert len(with_text_negatives(lone, 1, seed=0)) == 1


def fold_data(n: int, fold: int = 0):
    cfg = RunConfig()
    cfg.data.text_negatives = n
    meta = rows()
    return SimpleNamespace(cfg=cfg, train_meta=meta[meta["fold"] != fold], seed=7)


def test_only_the_folds_training_rows_get_changed_texts():
    from readaloud.members.decoder.decoder import WhisperDecoderMember
    data = fold_data(1)
    out = WhisperDecoderMember().training_rows(data)
    made = out[out[SOURCE_COLUMN].notna()]
    assert len(made) == int((data.train_meta["score"] == 1).sum()) > 0
    assert set(made["filename"]) <= set(data.train_meta["filename"])
    assert (made["fold"] != 0).all(), "a held-out row was given a changed text"
    assert WhisperDecoderMember().training_rows(fold_data(0)).equals(data.train_meta)


def test_a_family_that_cannot_read_made_texts_refuses():
    """run_fold asks every member (Member.check_options) before any work: the families that read a
    TTS reference or ASR evidence made for each text refuse; the decoder takes the option."""
    from readaloud.members.registry import member_named
    with pytest.raises(ConfigError, match="text_negatives"):
        member_named("pair").check_options(fold_data(1).cfg)
    member_named("whisperdec").check_options(fold_data(1).cfg)
    member_named("gbm").check_options(fold_data(0).cfg)


def test_the_trees_refuse_made_texts_rather_than_ignore_them():
    from readaloud.members.registry import member_named
    with pytest.raises(ConfigError, match="text_negatives"):
        member_named("gbm").check_options(fold_data(1).cfg)


def test_a_fold_of_a_refusing_family_stops_before_any_work(tmp_path):
    """Through run_fold: the refusal comes before the fold writes its config or reads any data."""
    from readaloud.pipeline.fold_run import run_fold
    (tmp_path / "data" / "cache").mkdir(parents=True)
    (tmp_path / "data" / "cache" / "folds.json").write_text('{"n_folds": 2}')
    (tmp_path / "data" / "cache" / "folds_2.csv").write_text("filename,fold\na.wav,0\nb.wav,1\n")
    with pytest.raises(ConfigError, match="text_negatives 1: model.arch gbm"):
        run_fold("model6asr", 0, tmp_path / "data", tmp_path / "assets", tmp_path / "tts",
                 {"text_negatives": "1"}, quiet=True, progress=False)
    assert not list((tmp_path / "assets").rglob("*.json")), "the refused fold wrote its config"
