"""The expected text's log p after a prompt of the task's words (members/gbm/prompted.py) and its block
in the trees' table."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def tiny():
    from readaloud.members.gbm.evidence import WhisperEvidence
    return WhisperEvidence("whisper-tiny.en", threads=2)


def test_a_prompt_lists_the_written_words_once_and_only_when_they_fit(tiny):
    from readaloud.members.gbm import prompted
    words = ["nine", "9", "two", "2", "nine", "seven"]
    assert prompted.prompt_words(words) == ["nine", "seven", "two"]
    assert prompted.vocabulary_key(words) == prompted.vocabulary_key(["two", "seven", "nine"])
    assert prompted.vocabulary_key(words) != prompted.vocabulary_key(["two", "nine"])
    ids = prompted.prompt_ids(tiny, words)
    assert ids[0] == tiny.tokenizer.token_to_id("<|startofprev|>")
    assert tiny.tokenizer.decode(ids[1:]) == " nine seven two"
    many = [f"word{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(prompted.PROMPT_MAX_TOKENS)]
    assert prompted.prompt_ids(tiny, many) is None, "more tokens than a prompt may hold"
    assert prompted.prompt_ids(tiny, ["7", "9"]) is None, "no written word to list"
    assert tiny.tokenizer.decode(prompted.prompted_text_ids(tiny, "Seven, two nine.")) == " seven two nine"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """espeak saying a digit span; rows: its own text, a substituted digit, a sentence task whose
    vocabulary is too long for a prompt, an unreadable clip."""
    from readaloud.audio import resample, write_wav
    from readaloud.tts import make_tts
    folder = tmp_path_factory.mktemp("prompted_data")
    tts = make_tts("espeak")
    write_wav(folder / "a.wav", resample(tts.synthesize("seven two nine"), tts.sample_rate, 16000))
    (folder / "broken.wav").write_bytes(b"not a wav")
    meta = pd.DataFrame({"filename": ["a.wav", "a.wav", "a.wav", "broken.wav"],
                         "task": ["digit_span", "digit_span", "sentence", "digit_span"],
                         "expected_text": ["seven two nine", "seven five nine", "seven two nine", "six"]})
    long_vocabulary = [f"word{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(200)]
    return folder, meta, {"digit_span": DIGITS, "sentence": long_vocabulary}


def test_prompted_log_p_scores_rows_with_a_prompt_and_is_cached(tiny, clips, tmp_path, monkeypatch, caplog):
    from readaloud.audio import load_audio
    from readaloud.members.gbm import evidence as asr
    from readaloud.members.gbm import prompted
    folder, meta, words = clips
    open_table = asr.asr_table(meta, folder, tiny, None, progress=False)
    cache = tmp_path / "prompted.npz"
    with caplog.at_level(logging.WARNING, logger="readaloud"):
        table = prompted.prompted_table(meta, folder, tiny, words, cache, progress=False)
    assert table.ok.tolist() == [True, True, False, False] and "broken.wav" in caplog.text
    assert np.isnan(table.X[2:]).all(), "no prompt for the sentence task; an unreadable clip has no evidence"
    # the values are the teacher-forced log p after the prompt, computed here from the encoder output
    audio = load_audio(folder / "a.wav")
    prompt = prompted.prompt_ids(tiny, words["digit_span"])
    for row, text in enumerate(["seven two nine", "seven five nine"]):
        lp = prompted.prompted_logprobs(tiny, audio, prompt, [prompted.prompted_text_ids(tiny, text)])[0]
        np.testing.assert_allclose(table.X[row], [lp.mean(), lp.min(), lp.sum()], rtol=1e-5)
    assert table.X[0, 0] > table.X[1, 0] + 0.5, "the clip's own text is far likelier than a substituted digit"
    # without a prompt the same call is asr's own teacher forcing
    ids = prompted.prompted_text_ids(tiny, "seven two nine")
    np.testing.assert_allclose(prompted.prompted_logprobs(tiny, audio, [], [ids])[0],
                               tiny.token_logprobs(np.asarray(tiny.encode([audio])), [0], [ids])[0], atol=1e-5)
    block = prompted.prompted_block(open_table, table)
    gain = dict(zip(prompted.PROMPT_FEATURE_NAMES, block.T))["prompt_gain_mean_logp"]
    np.testing.assert_allclose(gain[:2], table.X[:2, 0] - open_table.X[:2, asr.FEATURE_NAMES.index("exp_mean_logp")],
                               rtol=1e-6)

    def no_scoring(*a):
        raise AssertionError("scored again although the cache has the rows")
    monkeypatch.setattr(prompted, "prompted_logprobs", no_scoring)
    again = prompted.prompted_table(meta, folder, tiny, words, cache, progress=False)
    np.testing.assert_array_equal(again.X[:2], table.X[:2])
    assert again.ok.tolist() == table.ok.tolist()
    other = dict(words, digit_span=DIGITS[:6] + ["seven", "nine"])    # another vocabulary is another prompt
    monkeypatch.undo()
    calls = []
    original = prompted.prompted_logprobs
    monkeypatch.setattr(prompted, "prompted_logprobs", lambda *a: calls.append(1) or original(*a))
    prompted.prompted_table(meta, folder, tiny, other, cache, progress=False)
    assert len(calls) == 1, "one align call for both rows of the clip under the new prompt"


def test_the_prompted_block_comes_with_the_closed_vocabulary_and_keeps_rows_without_a_prompt():
    from readaloud.config import ModelConfig
    from readaloud.members.gbm.gbm import FeatureLayout
    from readaloud.members.gbm import closed as closed_vocab
    from readaloud.members.gbm.evidence import FEATURE_NAMES, AsrTable
    from readaloud.members.gbm.prompted import PROMPT_FEATURE_NAMES, TABLE_COLUMNS
    mc = ModelConfig(arch="gbm", gbm_features="asr", asr_backbones="whisper-tiny.en,whisper-base",
                     asr_closed_vocab=True)
    without = FeatureLayout.of(mc)
    mc.asr_prompt_logp = True
    layout = FeatureLayout.of(mc)
    assert not without.prompted and layout.prompted
    added = [n for n in layout.names if n not in without.names]
    assert added == [f"asr_{b}_{n}" for b in ("whisper-tiny.en", "whisper-base") for n in PROMPT_FEATURE_NAMES]
    mc.asr_closed_vocab = False
    assert not FeatureLayout.of(mc).prompted, "the prompt's words are the closed vocabulary's"

    rows = 3
    meta = pd.DataFrame({"filename": ["a", "b", "c"], "task": ["digits"] * 3, "expected_text": ["one", "two", "six"],
                         "grade": ["1"] * 3})

    def table(width, value):
        return AsrTable(np.full((rows, width), value, np.float32), np.ones(rows, bool), ["one"] * rows,
                        [[] for _ in range(rows)])
    opened = [table(len(FEATURE_NAMES), -1.0), table(len(FEATURE_NAMES), -2.0)]
    closed = [table(len(closed_vocab.TABLE_COLUMNS), 0.0) for _ in range(2)]
    prompts = [table(len(TABLE_COLUMNS), -0.5), table(len(TABLE_COLUMNS), np.nan)]
    prompts[1].ok[:] = False
    X, ok = layout.table(meta, ["digits"], None, opened, closed, prompts)
    assert X.shape == (rows, len(layout.names)) and ok.all(), "rows with no prompt stay usable (NaN features)"
    col = {n: X[:, k] for k, n in enumerate(layout.names)}
    np.testing.assert_allclose(col["asr_whisper-tiny.en_prompt_gain_mean_logp"], 0.5)
    assert np.isnan(col["asr_whisper-base_prompt_mean_logp"]).all()
    with pytest.raises(ValueError, match="prompted"):
        layout.table(meta, ["digits"], None, opened, closed, prompts[:1])


def test_the_asr_pass_scores_the_prompt_from_its_own_encoder_output(tiny, clips, tmp_path, monkeypatch):
    """gbm.asr_evidence with words and prompt: the prompted log p comes out of the ASR evidence pass
    (no encoder pass of its own) and equals that of a separate prompted pass."""
    import shutil
    from readaloud.members.gbm import gbm
    from readaloud.members.gbm import prompted
    folder, meta, words = clips
    reference = prompted.prompted_table(meta, folder, tiny, words, tmp_path / "reference.npz", progress=False)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.wav", "broken.wav"):
        shutil.copy(folder / name, data / name)
    monkeypatch.setattr(gbm, "evidence_model", lambda *a, **k: tiny)
    gbm.asr_evidence("whisper-tiny.en", meta, data, "cpu", 0, False, words)
    assert not prompted.prompted_cache_path(data, tiny).exists(), "no prompt asked for"
    data2 = tmp_path / "data2"
    shutil.copytree(folder, data2)
    gbm.asr_evidence("whisper-tiny.en", meta, data2, "cpu", 0, False, words, True)
    scored = prompted.read_prompted_cache(prompted.prompted_cache_path(data2, tiny)).values
    assert len(scored) == 2, "both digit rows of the readable clip, nothing for the sentence task"

    def no_scoring(*a):
        raise AssertionError("a second encoder pass for a clip the ASR pass already scored")
    monkeypatch.setattr(prompted, "prompted_logprobs", no_scoring)
    again = prompted.prompted_table(meta, data2, tiny, words, prompted.prompted_cache_path(data2, tiny), progress=False)
    np.testing.assert_allclose(again.X, reference.X, rtol=1e-6)
    assert again.ok.tolist() == reference.ok.tolist()


def test_per_clip_prompts_give_a_too_long_task_its_clips_own_words(tiny, clips, tmp_path):
    """asr_prompt_per_clip: the sentence row (its task's words do not fit) is scored after a prompt of
    its own expected words; rows whose task fits keep the task's prompt; the ASR pass's requests
    carry the same prompts, cached apart from the task prompts."""
    from readaloud.audio import load_audio
    from readaloud.members.gbm import prompted
    folder, meta, words = clips
    rows = prompted.row_prompts(meta, tiny, words, per_clip=True)
    assert rows[0] == rows[1] == rows[3] != rows[2]
    assert rows[2][1].startswith("own_") and tiny.tokenizer.decode(list(rows[2][0][1:])) == " nine seven two"
    assert prompted.row_prompts(meta, tiny, words)[2] is None, "off: no prompt, as before"
    cache = tmp_path / "prompted.npz"
    table = prompted.prompted_table(meta, folder, tiny, words, cache, progress=False, per_clip=True)
    assert table.ok.tolist() == [True, True, True, False]
    audio = load_audio(folder / "a.wav")
    lp = prompted.prompted_logprobs(tiny, audio, list(rows[2][0]), [prompted.prompted_text_ids(tiny, "seven two nine")])[0]
    np.testing.assert_allclose(table.X[2], [lp.mean(), lp.min(), lp.sum()], rtol=1e-5)
    assert abs(float(table.X[2, 0] - table.X[0, 0])) > 1e-4, "another prompt, another value"
    off = prompted.prompted_table(meta, folder, tiny, words, cache, progress=False)
    assert np.isnan(off.X[2]).all() and np.array_equal(off.X[:2], table.X[:2])
    requests = prompted.pending_requests(meta, tiny, words, None, per_clip=True)
    assert set(requests) == {"a.wav", "broken.wav"}
    assert {r.key for r in prompted.clip_requests(meta, tiny, words, per_clip=True).values()} == {rows[0][1], rows[2][1]}
