"""Closed-vocabulary transcripts (members/gbm/closed.py) and their block in the trees' table."""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest


def test_task_words_keep_each_task_apart_in_both_spellings():
    from readaloud.members.gbm.closed import merge_words, task_words, vocabulary_key
    meta = pd.DataFrame({"task": ["digits", "digits", "sentence", "sentence"],
                         "expected_text": ["Nine three", "six", "The cat, sat.", np.nan]})
    words = task_words(meta)
    assert words["digits"] == sorted({"nine", "three", "six", "9", "3", "6"})
    assert {"the", "cat", "sat"} <= set(words["sentence"]) and "nine" not in words["sentence"]
    merged = merge_words(words, {"digits": ["seven"], "blending": ["cat"]})
    assert "seven" in merged["digits"] and "nine" in merged["digits"] and merged["blending"] == ["cat"]
    assert vocabulary_key(["a", "b"]) == vocabulary_key(["b", "a"]) != vocabulary_key(["a"])


@pytest.fixture(scope="module")
def tiny():
    from readaloud.members.gbm.evidence import WhisperEvidence
    return WhisperEvidence("whisper-tiny.en", threads=2)


def test_only_the_vocabulary_can_be_written(tiny):
    from readaloud.members.gbm.closed import allowed_tokens, suppressed_tokens
    allowed = allowed_tokens(tiny, ["seven", "two"])
    suppress = set(suppressed_tokens(tiny, allowed))
    seven = tiny.tokenizer.encode(" seven", add_special_tokens=False).ids
    please = tiny.tokenizer.encode(" Please", add_special_tokens=False).ids
    assert set(seven) <= set(allowed) and not set(seven) & suppress
    assert set(please) <= suppress and tiny.eot not in suppress
    assert len(suppress) + len(allowed) == tiny.tokenizer.get_vocab_size()


@pytest.fixture(scope="module")
def digit_clips(tmp_path_factory):
    """espeak saying two digit spans; rows: each clip with its own text, one with a substituted
    digit, one unreadable clip."""
    from readaloud.audio import resample, write_wav
    from readaloud.tts import make_tts
    folder = tmp_path_factory.mktemp("closed_data")
    tts = make_tts("espeak")
    for name, text in [("a.wav", "seven two nine"), ("b.wav", "four one")]:
        write_wav(folder / name, resample(tts.synthesize(text), tts.sample_rate, 16000))
    (folder / "broken.wav").write_bytes(b"not a wav")
    meta = pd.DataFrame({"filename": ["a.wav", "a.wav", "b.wav", "broken.wav"],
                         "task": ["digit_span"] * 4,
                         "expected_text": ["seven two nine", "seven five nine", "four one", "six"]})
    spelled = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    words = {"digit_span": sorted(spelled + [str(d) for d in range(10)])}   # as task_words writes them
    return folder, meta, words


def test_closed_transcripts_score_rows_and_are_cached_per_clip_and_vocabulary(tiny, digit_clips, tmp_path,
                                                                            monkeypatch, caplog):
    from readaloud.members.gbm import closed
    folder, meta, words = digit_clips
    cache = tmp_path / "closed.npz"
    calls = []
    original = closed.closed_decode
    monkeypatch.setattr(closed, "closed_decode", lambda *a: calls.append(1) or original(*a))
    with caplog.at_level(logging.WARNING, logger="readaloud"):
        table = closed.closed_table(meta, folder, tiny, words, cache, progress=False)
    assert len(calls) == 2, "one decode per readable clip, though two rows share a.wav"
    assert table.ok.tolist() == [True, True, True, False] and "broken.wav" in caplog.text
    f = dict(zip(closed.CLOSED_FEATURE_NAMES, table.X.T))
    assert f["closed_exact_match"][0] == 1 and f["closed_exact_match"][2] == 1, table.transcripts
    assert f["closed_exact_match"][1] == 0 and f["closed_word_edit_rate"][1] == pytest.approx(1 / 3)
    assert np.isnan(table.X[3]).all()

    def no_decode(*a):
        raise AssertionError("decoded again although the cache has the clip")
    monkeypatch.setattr(closed, "closed_decode", no_decode)
    again = closed.closed_table(meta, folder, tiny, words, cache, progress=False)
    np.testing.assert_array_equal(again.X[:3], table.X[:3])
    monkeypatch.setattr(closed, "closed_decode", original)
    calls.clear()
    monkeypatch.setattr(closed, "closed_decode", lambda *a: calls.append(1) or original(*a))
    wider = {"digit_span": words["digit_span"] + ["ten"]}
    closed.closed_table(meta, folder, tiny, wider, cache, progress=False)
    assert len(calls) == 2, "another vocabulary is another decode"


def test_the_trees_table_gets_a_closed_block_per_backbone():
    from readaloud.config import ModelConfig
    from readaloud.members.gbm.gbm import FeatureLayout
    from readaloud.members.gbm.evidence import FEATURE_NAMES
    from readaloud.members.gbm.closed import CLOSED_FEATURE_NAMES
    mc = ModelConfig(arch="gbm", gbm_features="alignment+asr", asr_backbones="whisper-tiny.en,whisper-base")
    plain = FeatureLayout.of(mc)
    mc.asr_closed_vocab = True
    with_closed = FeatureLayout.of(mc)
    assert not plain.closed and with_closed.closed
    added = [n for n in with_closed.names if n not in plain.names]
    assert len(added) == 2 * len(CLOSED_FEATURE_NAMES) and all("closed_" in n for n in added)
    assert len(with_closed.names) == len(plain.names) + len(added)
    assert len(plain.names) > 2 * len(FEATURE_NAMES)


def test_the_closed_log_p_is_the_teacher_forced_log_p_of_the_closed_tokens(tiny, digit_clips, tmp_path):
    """closed_table's log p columns: mean and sum of the closed transcript's tokens teacher-forced on
    the clip (computed here directly from the encoder output), NaN for an unreadable clip; a wrong
    expected text is less likely than the closed transcript (margin < 0), a right one not by much."""
    from readaloud.audio import load_audio
    from readaloud.members.gbm import evidence as asr
    from readaloud.members.gbm import closed
    folder, meta, words = digit_clips
    table = closed.closed_table(meta, folder, tiny, words, tmp_path / "closed.npz", progress=False)
    col = {n: table.X[:, k] for k, n in enumerate(closed.TABLE_COLUMNS)}
    requests = closed.clip_requests(meta, tiny, words)
    for row, name in enumerate(meta["filename"][:3]):
        encoded = tiny.encode([load_audio(folder / name)])
        ids = tiny.closed_sequences(encoded, requests[name, "digit_span", meta["expected_text"][row]])[0]
        assert tiny.tokenizer.decode(ids).strip() == table.transcripts[row] and ids
        lp = tiny.token_logprobs(np.asarray(encoded), [0], [ids])[0]
        assert col["closed_mean_logp"][row] == pytest.approx(lp.mean(), abs=1e-5)
        assert col["closed_sum_logp"][row] == pytest.approx(lp.sum(), abs=1e-5)
    assert np.isnan(table.X[3]).all()
    model_table = asr.asr_table(meta, folder, tiny, None, progress=False)
    block = closed.closed_logp_block(model_table, table)
    margin = dict(zip(closed.CLOSED_LOGP_NAMES, block.T))["closed_margin_sum_logp"]
    exp_sum = model_table.X[:, asr.FEATURE_NAMES.index("exp_sum_logp")]
    np.testing.assert_allclose(margin[:3], exp_sum[:3] - col["closed_sum_logp"][:3], rtol=1e-6)
    assert margin[1] < margin[0] - 1, "'seven five nine' for 'seven two nine': far less likely"
    assert np.isnan(block[3]).all()


def test_the_closed_log_p_block_comes_with_the_closed_vocabulary_only():
    from readaloud.config import ModelConfig
    from readaloud.members.gbm.gbm import FeatureLayout
    from readaloud.members.gbm.closed import CLOSED_LOGP_NAMES
    mc = ModelConfig(arch="gbm", gbm_features="alignment+asr", asr_backbones="whisper-tiny.en,whisper-base",
                     asr_closed_vocab=True)
    closed_only = FeatureLayout.of(mc)
    mc.asr_closed_logp = True
    with_logp = FeatureLayout.of(mc)
    assert not closed_only.closed_logp and with_logp.closed_logp
    added = with_logp.names[len(closed_only.names) - 2:-2]   # before the task and grade codes
    assert added == [f"asr_{b}_{n}" for b in ("whisper-tiny.en", "whisper-base") for n in CLOSED_LOGP_NAMES]
    mc.asr_closed_vocab = False
    neither = FeatureLayout.of(mc)
    assert not neither.closed and not neither.closed_logp and not any("closed" in n for n in neither.names)


def test_the_asr_pass_decodes_the_closed_vocabulary_from_its_own_encoder_output(tiny, digit_clips, tmp_path,
                                                                               monkeypatch):
    """gbm.asr_evidence with words: the closed transcripts come out of the ASR evidence pass (no second
    encoder pass) and equal those of a separate closed pass."""
    import shutil
    from readaloud.members.gbm import gbm
    from readaloud.members.gbm import closed
    folder, meta, words = digit_clips
    reference = closed.closed_table(meta, folder, tiny, words, tmp_path / "reference.npz", progress=False)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.wav", "b.wav", "broken.wav"):
        shutil.copy(folder / name, data / name)
    monkeypatch.setattr(gbm, "evidence_model", lambda *a, **k: tiny)
    gbm.asr_evidence("whisper-tiny.en", meta, data, "cpu", 0, False, words)
    requests = closed.clip_requests(meta, tiny, words)
    decoded = closed.read_closed_cache(closed.closed_cache_path(data, tiny)).transcripts
    first = {n: r for (n, _, _), r in reversed(list(requests.items()))}   # each clip's first row's request
    assert set(decoded) == {f"{n}\t{first[n].key}" for n in ("a.wav", "b.wav")}, \
        "the ASR pass wrote both readable clips' first requests"

    def no_decode(*a):
        raise AssertionError("a second encoder pass for a clip the ASR pass already decoded")
    monkeypatch.setattr(closed, "closed_decode", no_decode)
    again = closed.closed_table(meta, data, tiny, words, closed.closed_cache_path(data, tiny), progress=False)
    np.testing.assert_array_equal(again.X, reference.X)
    assert again.transcripts == reference.transcripts


def test_model6asr_trains_and_infers_with_the_closed_block(tmp_path, root):
    """train.py + infer.py with --asr_closed_vocab true --asr_closed_logp true --asr_loop_features true
    --asr_prompt_logp true on a tiny demo set: the folds save the training vocabulary and read the closed, loop
    and prompted blocks, the ear copies get them too, every test row is scored by model6asr itself, and the
    test clips' closed decodes and prompts use the training words plus the row's own, never another row's."""
    import json

    from conftest import run_script
    from readaloud.checkpoints import safe_load
    from readaloud.members.gbm import gbm
    from readaloud.members.gbm.ear_augment import EarAugment, copies_dir
    from readaloud.members.gbm import evidence as asr
    from readaloud.members.gbm import closed, prompted
    from readaloud.members.gbm.loops import LOOP_FEATURE_NAMES
    data, assets, tts = tmp_path / "data", tmp_path / "assets", tmp_path / "tts"
    run_script(root, "make_demo_data.py", "--out", data, "--n-train", 20, "--n-test", 5, "--seed", 5)
    run_script(root, "preprocess.py", "--data", data, "--tts_dir", tts, "--n_folds", 2, "--workers", 1)
    options = ["--asr_backbones", "whisper-tiny.en", "--gbm_min_samples_leaf", "4", "--gbm_ear_copies", "1",
               "--asr_closed_vocab", "true", "--asr_closed_logp", "true", "--asr_loop_features", "true", "--asr_prompt_logp", "true",
               "--asr_new_word_trees", "true", "--asr_fold_vocabulary", "true", "--asr_fold_ears", "false"]
    run_script(root, "train.py", "--data", data, "--assets", assets, "--tts_dir", tts, "--n_folds", 2,
               "--models", "model6asr", "--jobs", 1, *options)
    run_script(root, "get_config.py", "--data", data, "--assets", assets)
    ck = safe_load(assets / "model6asr_0.pth")
    train_meta = pd.read_csv(data / "train_metadata.csv")
    words = json.loads(ck["closed_words"])
    assert words == closed.task_words(train_meta)
    assert sum("closed_" in n for n in ck["feature_names"]) == len(closed.CLOSED_FEATURE_NAMES) + len(
        closed.CLOSED_LOGP_NAMES) + len(LOOP_FEATURE_NAMES)
    assert [n for n in ck["feature_names"] if n.endswith("loop_share")] == [
        "asr_whisper-tiny.en_loop_share", "asr_whisper-tiny.en_closed_loop_share"], "loop features of both transcripts"
    assert [n for n in ck["feature_names"] if "prompt_" in n] == [
        f"asr_whisper-tiny.en_{n}" for n in prompted.PROMPT_FEATURE_NAMES]
    model = gbm.evidence_model("whisper-tiny.en")
    # held-out rows: decoded over the other folds' words plus their own, and scored by the new-word trees
    # where those lack one of their words
    from readaloud.prep.folds import load_or_create_folds
    folds = load_or_create_folds(data, train_meta, 2).to_numpy()
    transcripts = closed.read_closed_cache(closed.closed_cache_path(data, model)).transcripts
    n_new = 0
    for k in (0, 1):
        rows, fold_words = train_meta[folds == k], closed.task_words(train_meta[folds != k])
        requests = closed.clip_requests(rows, model, fold_words)
        for (name, _, _), request in requests.items():
            assert f"{name}\t{request.key}" in transcripts, (k, name)
        summary = json.loads((assets / f"model6asr_{k}.json").read_text())
        assert summary["new_word_tasks"] == prompted.tasks_that_fit(model, words), "the small vocabularies"
        in_task = rows["task"].isin(summary["new_word_tasks"]).to_numpy()
        assert summary["n_valid_new_word_rows"] == int((closed.new_word_rows(rows, fold_words) & in_task).sum())
        n_new += int(closed.new_word_rows(rows, fold_words).sum())
    assert n_new > 0, "the demo's sentences give some held-out rows words the other fold lacks"
    for folder in (data, copies_dir(data, EarAugment())):
        assert closed.read_closed_cache(closed.closed_cache_path(folder, model)).transcripts, folder
        assert prompted.read_prompted_cache(prompted.prompted_cache_path(folder, model)).values, folder
    out = tmp_path / "submission.csv"
    inferred = run_script(root, "infer.py", "--data", data, "--assets", assets, "--tts_dir", tts, "--out", out,
                          "--no_progress")
    sub = pd.read_csv(out)
    assert len(sub) == 5 and sub["score"].between(0, 1).all()
    said = inferred.stdout + inferred.stderr
    assert "prediction failed" not in said and "from 2/2 checkpoints (model6asr)" in said, said[-2000:]
    test_meta = pd.read_csv(data / "test_metadata.csv")
    vocabularies = closed.row_vocabularies(test_meta, words)
    keys = closed.read_closed_cache(closed.closed_cache_path(data, model)).transcripts
    requests = closed.clip_requests(test_meta, model, words)
    for name, task, text, vocabulary in zip(test_meta["filename"], test_meta["task"], test_meta["expected_text"],
                                            vocabularies):
        own = closed.task_words(pd.DataFrame({"task": [task], "expected_text": [text]}))[task]
        assert set(vocabulary) == set(words[task]) | set(own), "the task's training words and the row's own"
        assert requests[name, task, text].key.startswith(closed.vocabulary_key(vocabulary))
        assert f"{name}\t{requests[name, task, text].key}" in keys, name
    scored = prompted.read_prompted_cache(prompted.prompted_cache_path(data, model)).values
    test_prompts = prompted.row_prompts(test_meta, model, words, per_clip=True)   # model6asr's default
    assert any(p is not None and not p[1].startswith("own_") for p in test_prompts), \
        "the demo's word tasks fit in a prompt"
    for name, text, prompt, vocabulary in zip(test_meta["filename"], asr.expected_texts(test_meta), test_prompts,
                                              vocabularies):
        if prompt is None:
            continue
        if not prompt[1].startswith("own_"):   # a task prompt: the task's training words and the row's own
            assert prompt[1] == prompted.vocabulary_key(vocabulary)
        assert f"{name}\t{text}\t{prompt[1]}" in scored, name


def test_the_closed_decode_is_skipped_only_where_it_must_equal_the_open_one(tiny, digit_clips, monkeypatch):
    """closed_equals_open: a clip whose open decode wrote only tokens the closed vocabulary allows gets
    its open transcript as the closed one without a second decode, and a real closed decode writes
    the same; a vocabulary that lacks a token the open decode wrote, or allows a symbol the open
    decode may not write, decodes."""
    from readaloud.audio import load_audio
    from readaloud.members.gbm.evidence import ClosedRequest
    from readaloud.members.gbm.closed import allowed_tokens, suppressed_tokens, vocabulary_key
    folder, _, words = digit_clips
    decoded = []
    real_sequences = tiny.closed_sequences
    monkeypatch.setattr(tiny, "closed_sequences", lambda enc, req: decoded.append(1) or real_sequences(enc, req))
    for name, text in [("a.wav", "seven two nine"), ("b.wav", "four one")]:
        audio = load_audio(folder / name)
        (open_decode,), _ = tiny.evidence([audio], [[text]])
        assert open_decode.text_only and open_decode.token_ids, open_decode

        def closed_of(vocabulary, extra=(), max_length=128):
            suppress = suppressed_tokens(tiny, sorted(set(allowed_tokens(tiny, vocabulary)) | set(extra)))
            request = ClosedRequest(vocabulary_key(vocabulary + [str(t) for t in extra]), suppress, max_length)
            decoded.clear()
            (decode,), _ = tiny.evidence([audio], [[text]], closed=[request])
            full = tiny.tokenizer.decode(real_sequences(tiny.encode([audio]), request)[0]).strip()
            return decode.closed[request.key].text, full

        shortcut, full = closed_of(words["digit_span"], extra=open_decode.token_ids)
        assert decoded == [] and shortcut == full == open_decode.transcript, (shortcut, full)
        shortcut, full = closed_of(["ten"])
        assert decoded == [1] and shortcut == full
        symbol = next(t for t in tiny.default_suppressed if t < tiny.eot)
        shortcut, full = closed_of(words["digit_span"], extra=[*open_decode.token_ids, symbol])
        assert decoded == [1] and shortcut == full, "a vocabulary with a default-suppressed symbol decodes"
        short = 2 * len(open_decode.token_ids)   # room for every token but the end of text
        shortcut, full = closed_of(words["digit_span"], extra=open_decode.token_ids, max_length=short)
        assert decoded == [1] and shortcut == full, "a limit the open sequence does not fit in decodes"
        assert len(tiny.tokenizer.encode(" " + full, add_special_tokens=False).ids) <= len(open_decode.token_ids)


def test_a_closed_decode_stops_at_its_limit_and_the_limit_keys_the_cache(tiny, digit_clips, tmp_path):
    """closed_max_length: 4x the longest expected text's tokens + 8 (twice that in CTranslate2's
    max_length, of which ctranslate2 4.x writes half), never above the open decode's limit; a
    decode with a smaller limit writes no more tokens than it allows and starts as the unlimited
    one; a longer expected text is another request, so the cache never hands a clip a transcript
    cut at another limit."""
    from readaloud.audio import load_audio
    from readaloud.members.gbm import closed
    from readaloud.members.gbm.evidence import ClosedRequest
    folder, meta, words = digit_clips
    n = len(tiny.tokenizer.encode(" seven two nine", add_special_tokens=False).ids)
    assert closed.closed_max_length(tiny, ["four", "seven two nine"]) == 2 * (4 * n + 8)
    assert closed.closed_max_length(tiny, [" ".join(["seven"] * 100)]) == tiny.settings.max_length
    suppress = closed.suppressed_tokens(tiny, closed.allowed_tokens(tiny, words["digit_span"]))
    encoded = tiny.encode([load_audio(folder / "a.wav")])
    free = tiny.closed_decode(encoded, ClosedRequest("free", suppress, 128))[0]
    for limit in (2, 4, 6):
        cut = tiny.closed_decode(encoded, ClosedRequest("digits", suppress, limit))[0]
        ids = tiny.tokenizer.encode(" " + cut, add_special_tokens=False).ids if cut else []
        assert len(ids) <= limit // 2 and free.startswith(cut), (limit, cut, free)
    requests = closed.clip_requests(meta, tiny, words)
    assert requests["a.wav", "digit_span", "seven five nine"].max_length == closed.closed_max_length(
        tiny, ["seven five nine"]), "each row's limit from its own text alone"
    longer = meta.assign(expected_text=meta["expected_text"].where(meta["filename"] != "b.wav",
                                                                   "four one four one four one"))
    other = closed.clip_requests(longer, tiny, words)
    assert other["b.wav", "digit_span", "four one four one four one"].key != requests["b.wav", "digit_span", "four one"].key
    assert other["a.wav", "digit_span", "seven two nine"] == requests["a.wav", "digit_span", "seven two nine"]
    cache = tmp_path / "closed.npz"
    closed.closed_table(meta, folder, tiny, words, cache, progress=False)
    assert set(closed.pending_requests(meta, tiny, words, cache)) == {"broken.wav"}, "unreadable: never cached"
    assert set(closed.pending_requests(longer, tiny, words, cache)) == {"b.wav", "broken.wav"}


def test_a_rows_vocabulary_depends_on_that_row_alone():
    """row_vocabularies: the task's training words plus the row's own; adding a row with new words,
    of a known task or of one never trained on, leaves every other row's vocabulary as it was."""
    from readaloud.members.gbm import closed
    words = {"digit_span": ["1", "2", "4", "7", "four", "one", "seven", "two"], "blending": ["cat", "dog"]}
    meta = pd.DataFrame({"task": ["digit_span", "digit_span"], "expected_text": ["seven two", "seven nine"]})
    alone = closed.row_vocabularies(meta, words)
    assert alone[0] == words["digit_span"]
    assert set(alone[1]) == set(words["digit_span"]) | {"nine", "9"}
    more = pd.concat([meta, pd.DataFrame({"task": ["digit_span", "mystery"],
                                          "expected_text": ["eight zero", "zebra"]})], ignore_index=True)
    together = closed.row_vocabularies(more, words)
    assert together[:2] == alone, "another row's words never reach this row's vocabulary"
    assert set(together[3]) == set(words["digit_span"]) | {"cat", "dog", "zebra"}, \
        "a task never trained on: every training word and its own"


def test_a_row_has_new_words_by_its_own_text_alone():
    """new_word_rows: a row whose text has a word its task's training words lack (as written or
    normalised); a task never trained on is judged against every training word; other rows have no say."""
    from readaloud.members.gbm import closed
    words = {"digit_span": ["1", "2", "4", "7", "four", "one", "seven", "two"], "blending": ["cat", "dog"]}
    meta = pd.DataFrame({"task": ["digit_span", "digit_span", "digit_span", "mystery", "mystery", "digit_span"],
                         "expected_text": ["Seven, two.", "seven nine", "7 2", "dog cat", "zebra", ""]})
    flags = closed.new_word_rows(meta, words)
    assert flags.tolist() == [False, True, False, False, True, False]
    for i in range(len(meta)):
        assert closed.new_word_rows(meta.iloc[[i]], words)[0] == flags[i], "each row is judged alone"


def test_rows_with_new_words_are_scored_by_the_vocabulary_free_trees(monkeypatch):
    """GBMModel with new-word trees: a row whose words are all training words gets the fold's trees'
    logit; a row with a new word in one of the trees' tasks gets the new-word trees' logit on the
    columns without the closed and prompted blocks, so changing its closed features changes nothing; a
    new word in another task (a sentence) keeps the fold's trees; a fold without new-word trees scores
    every row with its own trees."""
    from readaloud.config import ModelConfig
    from readaloud.members.gbm import gbm
    layout = gbm.FeatureLayout(alignment=False, asr_backbones=("whisper-tiny.en",), closed=True, closed_logp=True,
                               loops=True, prompted=True)
    names = layout.names
    free = layout.without_vocabulary().names
    assert set(free) < set(names) and not any("closed" in n or "prompt" in n for n in free)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, len(names)))
    closed_cols = [i for i, n in enumerate(names) if n not in free]
    y = (X[:, closed_cols[0]] > 0).astype(int)   # the fold's trees lean on a closed column
    mc = ModelConfig(gbm_max_iter=30, gbm_min_samples_leaf=5)
    full = gbm.export_trees(gbm.fit_gbm(X, y, mc, 0))
    new = gbm.NewWordTrees.fit(layout, names, X, y, mc, 0, None, None, np.zeros(len(y), bool), ["digit_span"])
    assert new.names == [n for n in names if n in free]
    words = {"digit_span": ["one", "seven", "two", "1", "7", "2"]}
    ck = {"feature_names": names, "state_dict": full, "tasks": ["digit_span"], "asr_version": gbm.asr.ASR_VERSION,
          "closed_words": json.dumps(words), **new.payload()}
    model = gbm.GBMModel(ck, layout)
    words["sentence_repetition"] = ["the", "cat", "sat"]
    meta = pd.DataFrame({"task": ["digit_span", "digit_span", "sentence_repetition"],
                         "expected_text": ["seven two", "seven nine", "the dog sat"]})
    rows = X[:3].copy()
    ck["closed_words"] = json.dumps(words)
    model = gbm.GBMModel(ck, layout)
    monkeypatch.setattr(gbm.FeatureLayout, "table", lambda self, *a, **k: (rows.copy(), np.ones(3, bool)))
    out = model.predict(meta, None)
    assert out[0] == pytest.approx(gbm.TreeEnsemble(full, len(names)).decision_function(rows[:1])[0])
    assert out[1] == pytest.approx(new.logits(rows[1:2], names)[0])
    full_logits = gbm.TreeEnsemble(full, len(names)).decision_function(rows)
    assert out[2] == pytest.approx(full_logits[2]), "a new word of a task outside the trees' tasks: the fold's trees"
    rows[:, closed_cols] = -rows[:, closed_cols]   # the column the fold's trees split on changes sign
    moved = model.predict(meta, None)
    assert moved[1] == out[1] and moved[0] != out[0], "only the rows the fold's trees score read the closed block"
    plain = gbm.GBMModel({k: v for k, v in ck.items() if not k.startswith("new_word")}, layout)
    assert plain.predict(meta, None)[1] == pytest.approx(
        gbm.TreeEnsemble(full, len(names)).decision_function(rows[1:2])[0])
