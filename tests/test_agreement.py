"""Agreement between transcripts (whisper/agreement.py): distances per expected word, NaN where a
side has no evidence, and the trees' table gets the block when asked."""
import numpy as np
import pandas as pd
import pytest

from readaloud.config import ModelConfig
from readaloud.members.gbm import FeatureLayout
from readaloud.whisper.agreement import agreement_block, agreement_names, disagreement
from readaloud.whisper.asr import FEATURE_NAMES, AsrTable
from readaloud.whisper.closed import TABLE_COLUMNS


def test_disagreement_compares_normalised_words_per_expected_word():
    assert disagreement("seven two nine", "Seven, two, nine.", "7 2 9") == 0
    assert disagreement("two two six three", "to take the...", "Two, three, two, three.") == pytest.approx(4 / 4)
    assert disagreement("six", "", "B.") == 1


def test_agreement_block_has_one_column_per_pair():
    ok = np.array([True, False])
    block = agreement_block(["seven two", "one"], [["7, 2", "1"], ["7, 3", "one"]], [ok, ok],
                            [["7 2", "1"], ["7 2", "1"]], [ok, ok])
    assert agreement_names(["tiny", "base"], True) == ["open_disagreement", "closed_disagreement",
                                                       "tiny_open_closed_disagreement", "base_open_closed_disagreement"]
    assert block.shape == (2, 4) and block[0].tolist() == [0.5, 0, 0, 0.5] and np.isnan(block[1]).all()
    assert agreement_names(["tiny"], False) == [] and agreement_block(["a"], [["a"]], [ok[:1]]).shape == (1, 0)


def test_the_trees_table_gets_the_agreement_block():
    mc = ModelConfig(arch="gbm", gbm_features="asr", asr_backbones="whisper-tiny.en,whisper-base",
                     asr_closed_vocab=True)
    plain = FeatureLayout.of(mc)
    mc.asr_agreement = True
    layout = FeatureLayout.of(mc)
    assert layout.names[len(plain.names) - 2:-2] == [
        "asr_open_disagreement", "asr_closed_disagreement", "asr_whisper-tiny.en_open_closed_disagreement",
        "asr_whisper-base_open_closed_disagreement"]
    meta = pd.DataFrame({"filename": ["a.wav"], "task": ["digits"], "grade": ["1"], "expected_text": ["seven two"]})
    opened = [AsrTable(np.zeros((1, len(FEATURE_NAMES)), np.float32), np.array([True]), [t]) for t in ("7, 2", "to")]
    closed = [AsrTable(np.zeros((1, len(TABLE_COLUMNS)), np.float32), np.array([True]), [t]) for t in ("7 2", "2")]
    X, ok = layout.table(meta, ["digits"], None, opened + closed)
    assert X.shape == (1, len(layout.names)) and ok.all()
    assert X[0, layout.names.index("asr_open_disagreement")] == 1.0
    assert X[0, layout.names.index("asr_whisper-base_open_closed_disagreement")] == 0.5
