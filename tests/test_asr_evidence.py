"""ASR evidence (readaloud/members/gbm/evidence.py): text normalisation, the installed tiny.en on espeak speech,
and the per-clip cache (read back without recomputing, merged across calls, recomputed if damaged)."""
import json
import logging

import numpy as np
import pandas as pd
import pytest

from readaloud.normalise import (edit_distance, matched_pairs, normalise_tokens, normalise_words,
                                         spoken_text)

# ---- normalisation --------------------------------------------------------------------------------------

SAME = [
    ("five one five four", "5154"),
    ("five one five four", "5, 1, 5, 4."),
    ("five one five four", " Five, one, five, four."),
    ("twenty one", "21"),
    ("twenty-one", "21"),
    ("eight", "Eight."),
    ("eight", "8."),
    ("two hundred and five", "205"),
    ("one thousand", "1,000"),
    ("nineteen eighty four", "1984"),
    ("the first day", "The 1st day."),
    ("twenty first", "21st"),
    ("ann's dog", "Ann\u2019s dog."),
    ("let's go", "Let's go!"),
    ("i don't know", "I don't know..."),
    ("ice cream", "ice-cream"),
    ("the cat", "Um, the cat."),
    ("ok", "Okay."),
    ("five dollars", "$5"),
    ("fifty percent", "50%"),
    ("it's mine", "\"It's mine.\""),
]


@pytest.mark.parametrize("expected, transcript", SAME)
def test_whisper_spellings_normalise_to_the_expected_words(expected, transcript):
    assert normalise_words(expected) == normalise_words(transcript)


def test_normalised_forms():
    assert normalise_words("Five, one, five, four.") == ["5", "1", "5", "4"]
    assert normalise_words("Ann's dog didn't bark") == ["ann's", "dog", "didn't", "bark"]
    assert normalise_words("the twenty-first of May") == ["the", "21th", "of", "may"]
    assert normalise_words("five and six") == ["5", "and", "6"], "'and' joins numbers only after hundred/thousand"
    assert normalise_words("a hundred") == ["a", "hundred"], "a scale word alone is a word"
    assert normalise_words("two zero") == ["2", "0"] and normalise_words("seventh heaven") == ["7th", "heaven"]
    assert normalise_words("dogs' bones") == ["dogs", "bones"]
    assert normalise_words("...") == [] and normalise_words("") == []


def test_known_collisions_and_differences():
    # digit-by-digit tokens make "two one" and "twenty one" equal: the price of matching digit spans
    assert normalise_words("two one") == normalise_words("twenty one")
    for a, b in [("ann's", "ann"), ("let's", "lets"), ("seven two nine", "7 2 8"), ("the cat sat", "the cat sat down")]:
        assert normalise_words(a) != normalise_words(b), (a, b)


def test_tokens_remember_their_surface_words():
    spans = [(t.text, t.first, t.last) for t in normalise_tokens("I saw twenty one cats")]
    assert spans == [("i", 0, 0), ("saw", 1, 1), ("2", 2, 3), ("1", 2, 3), ("cats", 4, 4)]
    assert [(t.first, t.last) for t in normalise_tokens("5154.")] == [(0, 0)] * 4


def test_edit_distance_and_matching():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("a b c".split(), "a c".split()) == 1 and edit_distance([], ["x"]) == 1
    assert matched_pairs("a b c d".split(), "a x c d e".split()) == [(0, 0), (2, 2), (3, 3)]
    assert spoken_text(["2", "1", "cats", "21th"]) == "two one cats 21st"


def test_expected_text_is_written_as_whisper_writes_it():
    from readaloud.whisper.asr import render_expected
    assert render_expected("seven two nine", "7, 2, 9.") == (["7,", "2,", "9"], [[0], [1], [2]])
    assert render_expected("five one five four", "5154.") == (["5154"], [[0, 1, 2, 3]])
    assert render_expected("kate loves china", "Cajun loves China.") == (["Kate", "loves", "China"], [[0], [1], [2]])
    assert render_expected("that was i", "") == (["That", "was", "I"], [[0], [1], [2]])


# ---- the installed tiny.en --------------------------------------------------------------------------------

SENTENCE, SWAPPED, SWAP_AT = "the boy can jump high", "the boy can swim high", 3


@pytest.fixture(scope="module")
def tiny():
    from readaloud.members.gbm.evidence import WhisperEvidence
    return WhisperEvidence("whisper-tiny.en", threads=2)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A data folder of espeak speech (16 kHz wavs) and a metadata table: two rows share a clip,
    one clip is missing."""
    from readaloud.audio import resample, write_wav
    from readaloud.tts import make_tts
    folder = tmp_path_factory.mktemp("asr_data")
    tts = make_tts("espeak")
    for name, text in [("a.wav", SENTENCE), ("b.wav", "please open the door"), ("c.wav", "three six four")]:
        write_wav(folder / name, resample(tts.synthesize(text), tts.sample_rate, 16000))
    meta = pd.DataFrame({"filename": ["a.wav", "a.wav", "b.wav", "c.wav", "missing.wav"],
                         "expected_text": [SENTENCE, SWAPPED, "please open the door", "three six four", "hello"]})
    return folder, meta


def _count_decodes(model, monkeypatch) -> list:
    calls = []
    original = model.decode

    def counted(encoded):
        out = original(encoded)
        calls.extend(d.transcript for d in out)
        return out
    monkeypatch.setattr(model, "decode", counted)
    return calls


def test_espeak_sentence_matches_and_a_swapped_word_is_the_least_likely(tiny, clips, monkeypatch, caplog):
    from readaloud.members.gbm.evidence import FEATURE_NAMES, asr_table
    folder, meta = clips
    decodes = _count_decodes(tiny, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="readaloud"):
        table = asr_table(meta, folder, tiny, progress=False)
    assert len(decodes) == 3, "one decode per clip, though two rows share a.wav"
    assert table.ok.tolist() == [True, True, True, True, False] and "missing.wav" in caplog.text
    f = {name: table.X[:, k] for k, name in enumerate(FEATURE_NAMES)}
    assert table.transcripts[0] == table.transcripts[1]
    assert f["exact_match"][0] == 1 and f["word_edits"][0] == 0, table.transcripts[0]
    assert f["exact_match"][3] == 1, f"digits written as Whisper writes them: {table.transcripts[3]!r}"
    assert f["exact_match"][1] == 0 and f["word_edits"][1] == 1 and f["char_edits"][1] > 0 and f["phone_edits"][1] > 0
    own, swapped = dict(table.words[0]), table.words[1]
    assert [w for w, _ in swapped] == SWAPPED.split()
    swapped_lp = [lp for _, lp in swapped]
    assert int(np.argmin(swapped_lp)) == SWAP_AT, swapped
    assert swapped_lp[SWAP_AT] < own["jump"] - 2.0
    assert f["exp_min_logp"][1] < f["exp_min_logp"][0] - 2.0
    assert f["exp_min_word_logp"][1] == pytest.approx(swapped_lp[SWAP_AT], abs=1e-4)
    assert f["margin_mean_logp"][1] < f["margin_mean_logp"][0]
    assert np.isfinite(table.X[:4]).all() and np.isnan(table.X[4]).all()


def test_one_clip_gives_a_documented_vector(tiny, clips):
    from readaloud.audio import load_audio
    from readaloud.members.gbm.evidence import FEATURES, clip_evidence
    folder, _ = clips
    names, vector, evidence = clip_evidence(tiny, load_audio(folder / "b.wav"), "please open the door")
    assert names == list(FEATURES) and vector.dtype == np.float32 and vector.shape == (len(names),)
    assert all(FEATURES[n] for n in names) and evidence.transcript.lower().startswith("please open")


def test_asr_evidence_is_cached_once_per_clip(tiny, clips, tmp_path, monkeypatch, caplog):
    from readaloud.members.gbm import evidence as asr
    folder, meta = clips
    cache = tmp_path / "cache" / "asr.npz"
    decodes = _count_decodes(tiny, monkeypatch)
    first = asr.asr_table(meta, folder, tiny, cache, progress=False)
    assert cache.exists() and len(decodes) == 3

    def no_compute(*a, **k):
        raise AssertionError("a cached row was computed again")
    with monkeypatch.context() as m:
        m.setattr(tiny, "evidence", no_compute)
        cached = asr.asr_table(meta, folder, tiny, cache, progress=False)
    assert np.array_equal(cached.X, first.X, equal_nan=True) and np.array_equal(cached.ok, first.ok)
    assert cached.transcripts == first.transcripts and cached.words == first.words

    decodes.clear()  # a new text for a cached clip: scored, not decoded again
    extra = pd.DataFrame({"filename": ["a.wav"], "expected_text": ["the boy can run high"]})
    asr.asr_table(extra, folder, tiny, cache, progress=False)
    assert decodes == []
    with np.load(cache, allow_pickle=False) as z:
        assert len(z["row_keys"]) == 5 and len(z["clip_keys"]) == 3

    copy = tmp_path / "merged.npz"
    asr.asr_table(meta.iloc[:2], folder, tiny, copy, progress=False)
    asr.asr_table(meta.iloc[2:3], folder, tiny, copy, progress=False)
    with np.load(copy, allow_pickle=False) as z:
        assert len(z["row_keys"]) == 3, "a second call adds its rows to the first's"
        assert sorted(z["clip_keys"].tolist()) == ["a.wav", "b.wav"]
        assert json.loads(z["row_words"][0])[0][0] == "the"

    copy.write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING, logger="readaloud"):
        again = asr.asr_table(meta.head(2), folder, tiny, copy, progress=False)
    assert "unreadable" in caplog.text
    assert np.allclose(again.X, first.X[:2], atol=1e-4) and again.transcripts == first.transcripts[:2]


def test_cache_names_the_model_and_settings(tiny, tmp_path):
    from readaloud.members.gbm.evidence import AsrSettings, asr_cache_path, model_identity
    path = asr_cache_path(tmp_path, tiny)
    assert path.parent == tmp_path / "cache" and tiny.name in path.name
    assert model_identity(tiny.model_dir) in path.name and tiny.compute_type in path.name
    assert AsrSettings(window_s=30).key() != AsrSettings().key()


def test_zero_shot_probe_writes_its_report(tmp_path):
    """The probe command on a tiny espeak set: every row gets evidence, the report has both classifiers."""
    import shutil

    from readaloud.audio import resample, write_wav
    from readaloud.bench import zero_shot
    from readaloud.tts import make_tts
    tts = make_tts("espeak")
    sentences = ["i like to read books", "my name is tom", "we went to the zoo", "please open the door",
                 "the boy can jump high", "good morning teacher"]
    changed = ["i like to eat books", "my name is tim", "we went to the shop", "please close the door",
               "the boy can swim high", "good evening teacher"]
    rows = []
    for k, (own, other) in enumerate(zip(sentences, changed)):
        write_wav(tmp_path / f"own{k}.wav", resample(tts.synthesize(own), tts.sample_rate, 16000))
        shutil.copyfile(tmp_path / f"own{k}.wav", tmp_path / f"other{k}.wav")
        part = "train" if k < 4 else "test"
        rows += [(part, f"own{k}.wav", own, 1, "own"), (part, f"other{k}.wav", other, 0, "swap")]
    df = pd.DataFrame(rows, columns=["part", "filename", "expected_text", "score", "change"])
    df.assign(task="sentence_repetition", grade="1")[["filename", "change"]].assign(speaker="s").to_csv(
        tmp_path / "speakers.csv", index=False)
    for part, g in df.groupby("part"):
        g.assign(task="sentence_repetition", grade="1")[["filename", "task", "expected_text", "grade"]].to_csv(
            tmp_path / f"{part}_metadata.csv", index=False)
        g[["filename", "score"]].to_csv(tmp_path / f"{part}_labels.csv", index=False)
    report = zero_shot.main(["--data", str(tmp_path), "--backbones", "whisper-tiny.en", "--window_s", "10",
                             "--threads", "2", "--out", str(tmp_path / "report")])
    assert set(report["results"]["whisper-tiny.en"]) == {"gbm", "logreg"}
    assert report["backbones"]["whisper-tiny.en"]["test"]["exact_match_when_correct"] == 1.0
    assert 0 < report["results"]["whisper-tiny.en"]["logreg"]["logloss"] < 5
    assert set(report["prior"]["by_change"]) == {"own", "swap"}
    text = (tmp_path / "report" / "zero_shot.md").read_text()
    assert "| whisper-tiny.en | logreg |" in text and json.loads((tmp_path / "report" / "zero_shot.json").read_text())
    assert list((tmp_path / "cache").glob("asr_v*_whisper-tiny.en_*.npz")), "the evidence is cached in <data>/cache"


def test_clips_of_several_window_sizes_in_one_batch_equal_one_at_a_time(tiny, clips):
    """A clip longer than 10 s is read in a 20 s window; a batch mixing window sizes is encoded per
    size and gives each clip what it gets alone."""
    from readaloud.audio import load_audio
    folder, _ = clips
    short = load_audio(folder / "a.wav")
    long = np.concatenate([short, np.zeros(int(11.5 * 16000), np.float32)])
    assert tiny.window_s(short) == 10.0 and tiny.window_s(long) == 20.0
    texts = [[SENTENCE], [SENTENCE, SWAPPED]]
    decodes, rows = tiny.evidence([short, long], texts)
    for k, audio in enumerate([short, long]):
        d1, r1 = tiny.evidence([audio], [texts[k]])
        assert d1[0].transcript == decodes[k].transcript
        for a, b in zip(r1[0], rows[k]):
            assert np.allclose(a.features, b.features, atol=1e-4, equal_nan=True)
    assert decodes[1].transcript.lower().startswith(SENTENCE.split()[0].lower()), decodes[1].transcript


def test_workers_give_what_one_worker_gives_in_order(tiny, clips):
    """Two clips at a time on one thread each (the CPU default) score every row exactly as one clip on
    two threads does, and map_clips hands results back in input order, errors included."""
    import time

    from readaloud.members.gbm.evidence import WhisperEvidence, asr_table
    folder, meta = clips
    serial = WhisperEvidence("whisper-tiny.en", threads=2, workers=1)
    assert tiny.workers == 2 and serial.workers == 1
    parallel, one = asr_table(meta, folder, tiny, progress=False), asr_table(meta, folder, serial, progress=False)
    assert np.array_equal(parallel.X, one.X, equal_nan=True), "the thread count changed the evidence"
    assert parallel.transcripts == one.transcripts and parallel.ok.tolist() == one.ok.tolist()
    assert parallel.words == one.words

    def slow_first(i):
        time.sleep(0.02 * (6 - i))
        return i
    assert list(tiny.map_clips(slow_first, range(7))) == list(range(7))

    def fails_at_3(i):
        if i == 3:
            raise ValueError(f"clip {i}")
        return i
    with pytest.raises(ValueError, match="clip 3"):
        list(tiny.map_clips(fails_at_3, range(7)))


def test_a_sequence_asked_twice_on_one_clip_is_aligned_once_with_the_same_log_p(tiny, clips, monkeypatch):
    """An exact transcript is the expected text's own token sequence: the transcript's log p and the
    expected text's come from one alignment, and equal what separate alignments give."""
    from readaloud.audio import load_audio
    folder, _ = clips
    audio = [load_audio(folder / "a.wav"), load_audio(folder / "c.wav")]
    encoded = np.asarray(tiny.encode(audio))
    seq_a = tiny.word_token_ids(["jump"])[0]
    seq_b = tiny.word_token_ids(["three", "six"])
    seq_b = [t for ids in seq_b for t in ids]
    asked = []

    class Counted:  # CTranslate2's model is a C++ object: wrap it rather than patch it
        def __init__(self, model):
            self.model = model

        def __getattr__(self, name):
            return getattr(self.model, name)

        def align(self, features, start, sequences, frames):
            asked.extend(map(tuple, sequences))
            return self.model.align(features, start, sequences, frames)
    monkeypatch.setattr(tiny, "model", Counted(tiny.model))
    rows, seqs = [0, 1, 0, 1, 0], [seq_a, seq_b, seq_a, seq_a, []]
    together = tiny.token_logprobs(encoded, rows, seqs)
    assert len(asked) == 3, "(clip 0, a) twice is aligned once; (clip 1, a) is another clip's"
    assert np.array_equal(together[0], together[2]) and together[4].size == 0
    for k in (0, 1, 3):
        alone = tiny.token_logprobs(encoded, [rows[k]], [seqs[k]])[0]
        assert np.allclose(alone, together[k], atol=1e-5), k
    assert not np.allclose(together[0], together[3], atol=1e-3), "the same tokens on another clip differ"


def test_aligning_without_the_timing_work_gives_the_same_log_p(tiny, clips):
    """_aligned_logprobs asks align() for one encoder position of timing work (ALIGN_FRAMES): the
    token probabilities must be, bit for bit, what align() gives with the window's frames, after
    the plain start and after a prompt, for several rows at once."""
    import ctranslate2
    from readaloud.audio import load_audio
    from readaloud.members.gbm.evidence import ALIGN_FRAMES
    folder, _ = clips
    encoded = np.asarray(tiny.encode([load_audio(folder / "a.wav"), load_audio(folder / "c.wav")]))
    seqs = [tiny.word_token_ids(["jump"])[0], [t for ids in tiny.word_token_ids(["three", "six"]) for t in ids]]
    prompt = [tiny.tokenizer.token_to_id("<|startofprev|>"), *tiny.word_token_ids(["three"])[0]]
    for start in (tiny.start_sequence, [*prompt, *tiny.start_sequence]):
        ours = tiny._aligned_logprobs(encoded, start, seqs)
        full = tiny.model.align(ctranslate2.StorageView.from_array(np.ascontiguousarray(encoded)), start, seqs,
                                2 * int(encoded.shape[1]))
        assert ALIGN_FRAMES < 2 * encoded.shape[1]
        for lp, r in zip(ours, full):
            assert np.array_equal(lp, np.log(np.maximum(np.asarray(r.text_token_probs, np.float64), 1e-30)))
            assert lp.size and np.all(lp < 0)


THREADS_PROBE = """
import sys
import torch
import ctranslate2
from readaloud.whisper.backbones import ct2_model_dir
torch.set_num_threads(2)
print(torch.get_num_threads())
if sys.argv[1] == "raw":
    ctranslate2.models.Whisper(str(ct2_model_dir("whisper-tiny.en")), device="cpu", compute_type="int8",
                               inter_threads=2, intra_threads=1)
else:
    import numpy as np
    from readaloud.members.gbm.evidence import WhisperEvidence
    from readaloud.whisper.encoding import Ct2WindowEncoder
    WhisperEvidence("whisper-tiny.en", device="cpu", threads=2, workers=2)   # inter_threads 2, intra_threads 1
    print(torch.get_num_threads())
    Ct2WindowEncoder(ct2_model_dir("whisper-tiny.en"), threads=1)(np.zeros((1, 80, 1000), np.float32))
print(torch.get_num_threads())
"""


def test_loading_a_ctranslate2_model_leaves_torchs_threads_alone(root):
    """CTranslate2 sets the loading thread's OpenMP thread count (torch's too) to the model's
    intra_threads, so after the ASR models (one thread per clip) torch ran on one thread; the
    loaders put it back. Fresh interpreters: whether a load moves it depends on what the process
    did before (here as in train.py: torch's thread count read first)."""
    import subprocess
    import sys

    def threads_after(how: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", THREADS_PROBE, how], cwd=root, capture_output=True, text=True,
                             check=True).stdout
        return [int(x) for x in out.split()]
    assert threads_after("raw") == [2, 1], "the premise: a raw load moves torch's thread count"
    assert threads_after("loaders") == [2, 2, 2]
