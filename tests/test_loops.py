"""Greedy decoding loops (members/gbm/loops.py): the loop is found, what comes after the answer costs
nothing, and the trees' table gets one block per transcript when asked."""
import random

import numpy as np
import pandas as pd
import pytest

from readaloud.config import ModelConfig
from readaloud.members.gbm.gbm import FeatureLayout
from readaloud.members.gbm.evidence import FEATURE_NAMES, AsrTable
from readaloud.members.gbm.closed import TABLE_COLUMNS
from readaloud.members.gbm.loops import LOOP_FEATURE_NAMES, loop_block, loop_features, loop_length
from readaloud.normalise import edit_distance, prefix_edit_distances


def test_prefix_edit_distances_are_the_distances_to_every_prefix():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abc") for _ in range(rng.randrange(0, 7))]
        b = [rng.choice("abcd") for _ in range(rng.randrange(0, 10))]
        got = prefix_edit_distances(a, b)
        assert got.tolist() == [edit_distance(a, b[:k]) for k in range(len(b) + 1)], (a, b)
    assert prefix_edit_distances(["seven", "two"], ["seven", "two", "two", "two"]).min() == 0
    assert prefix_edit_distances("kitten", "sitting")[-1] == 3


@pytest.mark.parametrize("words, looped", [
    (["8", "1", "0", "3"] + ["8"] * 20, 19),                    # one word repeated to the limit
    ("i do not know where i do not know where i do not know where i do not k".split(), 13),  # cut mid-word
    (["7", "7", "7"], 0),                                       # "seven seven seven" said right
    ("lily gives up hockey lily gives up hockey".split(), 0),   # said twice is not a loop
    (["9", "3", "2", "3", "9", "3", "9", "3", "9", "3"], 5),    # "3 9" from the 4th word on
    ([], 0),
])
def test_loop_length_counts_the_repeats_after_the_first_cycle(words, looped):
    assert loop_length(words) == looped


def test_a_looped_right_answer_matches_at_its_start_and_an_error_does_not():
    share, word_rate, char_rate = loop_features("i do not know where", "I do not know where " * 5 + "I do")
    assert share > 0.7 and word_rate == 0 and char_rate == 0
    share, word_rate, _ = loop_features("zero three two zero", "0 0 0 0 0 0 0 0 0 0")
    assert share == pytest.approx(0.9) and word_rate == pytest.approx(2 / 4)   # "0 0 0 0": two substitutions
    share, word_rate, char_rate = loop_features("seven two nine", "7, 2, 9, 4.")   # a digit added at the end
    assert share == 0 and word_rate == 0 and char_rate == 0
    share, word_rate, char_rate = loop_features("seven two nine", "7, 3, 9.")       # substituted
    assert share == 0 and word_rate == pytest.approx(1 / 3) and char_rate == pytest.approx(1 / 5)
    assert loop_features("seven", "") == (0.0, 1.0, 1.0)


def _table(transcripts, ok):
    return AsrTable(np.zeros((len(transcripts), len(FEATURE_NAMES)), np.float32), np.asarray(ok), list(transcripts))


def test_the_trees_table_gets_the_loop_features_of_each_transcript():
    mc = ModelConfig(arch="gbm", gbm_features="asr", asr_backbones="whisper-tiny.en,whisper-base",
                     asr_closed_vocab=True)
    plain = FeatureLayout.of(mc)
    mc.asr_loop_features = True
    layout = FeatureLayout.of(mc)
    assert not plain.loops and layout.loops
    added = layout.names[len(plain.names) - 2:-2]
    assert added == [f"asr_{b}_{kind}{n}" for kind in ("", "closed_") for b in ("whisper-tiny.en", "whisper-base")
                     for n in LOOP_FEATURE_NAMES]
    meta = pd.DataFrame({"filename": ["a.wav", "b.wav"], "task": ["digits", "digits"], "grade": ["1", "2"],
                         "expected_text": ["seven two", "one"]})
    open_tables = [_table(["7, 2, 2, 2, 2, 2, 2", "1."], [True, True]), _table(["7, 3", "one"], [True, False])]
    closed_tables = [AsrTable(np.zeros((2, len(TABLE_COLUMNS)), np.float32), np.array([True, True]), ["7, 2", "2"])
                     for _ in range(2)]
    X, ok = layout.table(meta, ["digits"], None, open_tables, closed_tables)
    with pytest.raises(ValueError, match="4 ASR, 0 closed"):
        layout.table(meta, ["digits"], None, open_tables + closed_tables)
    assert X.shape == (2, len(layout.names)) and ok.tolist() == [True, False]
    column = {n: X[:, layout.names.index(n)] for n in added}
    assert column["asr_whisper-tiny.en_loop_share"][0] == pytest.approx(5 / 7)
    assert column["asr_whisper-tiny.en_prefix_word_edit_rate"].tolist() == [0, 0]
    assert column["asr_whisper-base_prefix_word_edit_rate"][0] == pytest.approx(0.5)
    assert np.isnan(column["asr_whisper-base_loop_share"][1]), "no evidence, no loop features"
    assert column["asr_whisper-base_closed_prefix_word_edit_rate"].tolist() == [0, 1]
    mc.asr_closed_vocab = False
    open_only = FeatureLayout.of(mc)
    assert len(open_only.names) - len(FeatureLayout.of(ModelConfig(
        arch="gbm", gbm_features="asr", asr_backbones="whisper-tiny.en,whisper-base")).names) \
        == 2 * len(LOOP_FEATURE_NAMES)
    assert not any("closed_" in n for n in open_only.names)


def test_loop_block_leaves_rows_without_evidence_missing():
    block = loop_block(["seven", "", "two"], ["7", "7", "3"], np.array([True, True, False]))
    assert block[0].tolist() == [0, 0, 0] and np.isnan(block[1:]).all()
