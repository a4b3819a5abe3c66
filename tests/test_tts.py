"""readaloud.tts: the espeak-ng engine, phonemes, voice listings and make_tts specs."""
from __future__ import annotations

import os
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from readaloud import tts
from readaloud.tts import TTS, EspeakTTS, espeak_variants, espeak_voices, make_tts, phonemize

SENTENCE = "the dog ran to the park"


@pytest.fixture(scope="module")
def default_tts() -> EspeakTTS:
    return EspeakTTS()


def test_synthesize_returns_plausible_float32_audio(default_tts):
    audio = default_tts.synthesize(SENTENCE)
    assert default_tts.sample_rate == 22050
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 0.6 < audio.size / default_tts.sample_rate < 4.0
    assert 0.05 < np.max(np.abs(audio)) <= 1.0
    assert np.sqrt(np.mean(audio ** 2)) > 0.01


def test_same_text_gives_identical_audio_whatever_was_said_before(default_tts):
    first = default_tts.synthesize(SENTENCE)
    EspeakTTS("en-gb+klatt3", pitch=90).synthesize("something else entirely")
    default_tts.phonemize("koovnorb")
    assert np.array_equal(first, default_tts.synthesize(SENTENCE))


def test_voices_and_settings_change_the_audio(default_tts):
    reference = default_tts.synthesize(SENTENCE)
    for other in (EspeakTTS("en-gb+m3"), EspeakTTS("en-us+f3", pitch=90), EspeakTTS("en-029+f1")):
        audio = other.synthesize(SENTENCE)
        assert audio.size != reference.size or not np.array_equal(audio, reference), other.name
    slow = EspeakTTS(rate=100).synthesize(SENTENCE)
    fast = EspeakTTS(rate=300).synthesize(SENTENCE)
    assert slow.size > 1.8 * fast.size


def test_engines_with_different_voices_share_the_process_safely(default_tts):
    engines = [default_tts, EspeakTTS("en-gb+m3"), EspeakTTS("en-us+f5", rate=200), EspeakTTS("en-029")]
    expected = [engine.synthesize("a big red ball") for engine in engines]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda engine: engine.synthesize("a big red ball"), engines * 2))
    for i, audio in enumerate(got):
        assert np.array_equal(audio, expected[i % len(engines)])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_reloads_espeak_and_gets_the_same_audio(default_tts):
    expected = default_tts.synthesize("hello there")
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            code = 0 if np.array_equal(EspeakTTS().synthesize("hello there"), expected) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert np.array_equal(default_tts.synthesize("hello there"), expected)


def test_copies_left_by_killed_processes_are_swept(tmp_path):
    """A process killed before its atexit leaves its library copy behind; the next process to
    copy the library removes it, and never a live process's copy or an unrelated folder."""
    import signal
    import subprocess
    import sys

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live_copy = tmp_path / f"readaloud-espeak-{sleeper.pid}-abc"
        dead_copy = tmp_path / f"readaloud-espeak-{dead.pid}-def"
        unrelated = tmp_path / "readaloud-espeak-notapid"
        for folder in (live_copy, dead_copy, unrelated):
            folder.mkdir()
            (folder / "libespeak-ng.so").write_bytes(b"x")
        assert tts._sweep_orphaned_copies(str(tmp_path)) == 1
        assert live_copy.is_dir() and unrelated.is_dir() and not dead_copy.exists()
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()


def test_own_copy_is_named_by_pid_and_removed_at_exit(tmp_path):
    import subprocess
    import sys

    code = (
        "import os, tempfile; from readaloud.tts import EspeakTTS; EspeakTTS().synthesize('hi');"
        "print([n for n in os.listdir(tempfile.gettempdir()) if n.startswith(f'readaloud-espeak-{os.getpid()}-')])"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith("['readaloud-espeak-")  # its own copy existed while it ran
    assert not any(p.name.startswith("readaloud-espeak-") for p in tmp_path.iterdir())  # gone at exit


def test_name_identifies_engine_and_settings():
    assert EspeakTTS().name == "espeak:en-us+f3:r165:p50"
    assert EspeakTTS("en-gb+m2", rate=150, pitch=70).name == "espeak:en-gb+m2:r150:p70"
    assert EspeakTTS(pitch_range=80, volume=120, word_gap=2).name == "espeak:en-us+f3:r165:p50:pr80:v120:g2"


def test_phoneme_mnemonics_in_double_brackets_are_spoken(default_tts):
    sound = default_tts.synthesize("[[k@]]")
    assert 0.05 < sound.size / default_tts.sample_rate < 1.0
    assert np.max(np.abs(sound)) > 0.05


@pytest.mark.parametrize("text", ["", "   ", None])
def test_empty_text_is_rejected(default_tts, text):
    with pytest.raises(ValueError):
        default_tts.synthesize(text)


@pytest.mark.parametrize("kwargs", [
    {"voice": "xx-nowhere"}, {"voice": "en-us+nosuchvariant"}, {"voice": ""},
    {"rate": 10}, {"rate": 1000}, {"pitch": 120}, {"pitch_range": -1}, {"volume": 300},
    {"rate": 165.5}, {"pitch": "high"},
])
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        EspeakTTS(**kwargs)


def test_voice_names_are_resolved_case_insensitively():
    assert EspeakTTS("en-GB+F3").synthesize("hi").size > 0
    assert EspeakTTS("en-gb-scotland+annie").synthesize("hi").size > 0


def test_phonemize_simple_words():
    assert phonemize("cat") == ["k", "æ", "t"]
    assert phonemize("ice") == ["aɪ", "s"]
    assert phonemize("church") == ["tʃ", "ɜː", "tʃ"]
    assert phonemize("") == []


def test_phonemize_nonword_is_sensible():
    tokens = phonemize("koovnorb")
    assert tokens[0] == "k" and tokens[-1] == "b"
    assert {"v", "n"} <= set(tokens)
    assert 5 <= len(tokens) <= 7
    assert any("uː" in token for token in tokens)  # length mark stays on its vowel


def test_phonemize_drops_stress_and_word_boundaries_and_reads_every_clause():
    sentence = phonemize(SENTENCE)
    assert all(token and not set(token) & set("ˈˌ '_") for token in sentence)
    assert len(sentence) == sum(len(phonemize(word)) for word in SENTENCE.split())
    assert phonemize("Hello, world. How are you?") == (
        phonemize("hello") + phonemize("world") + phonemize("how are you")
    )


def test_phonemize_espeak_mnemonics():
    assert EspeakTTS("en-us").phonemize("cat", ipa=False) == ["k", "a", "t"]


def test_voice_and_variant_listings():
    voices = espeak_voices()
    assert {"en-us", "en-gb", "en-029", "en-gb-scotland"} <= set(voices)
    assert all(voice.startswith("en") for voice in voices)
    assert "fr-fr" in espeak_voices("fr") or "fr" in espeak_voices("fr")
    variants = espeak_variants()
    assert {f"f{i}" for i in range(1, 6)} | {f"m{i}" for i in range(1, 8)} | {"klatt"} <= set(variants)
    for voice in ("en-gb-x-rp", "en-us-nyc"):
        assert EspeakTTS(f"{voice}+{variants[0]}").synthesize("hi").size > 0


def test_make_tts_builds_espeak_engines():
    default = make_tts("espeak")
    assert isinstance(default, EspeakTTS) and default.name == EspeakTTS().name
    assert make_tts("espeak:en-gb").voice == "en-gb"
    engine = make_tts("espeak:en-us+f2:rate=170:pitch=60:word_gap=1")
    assert (engine.voice, engine.rate, engine.pitch, engine.word_gap) == ("en-us+f2", 170, 60, 1)
    assert make_tts("espeak:rate=120").rate == 120
    assert make_tts(" ESPEAK:en-029 ").voice == "en-029"
    assert isinstance(engine, TTS)


@pytest.mark.parametrize("spec", [
    "", "   ", "espeak:en-us:rate", "espeak:en-us:speed=3", "espeak:xx-nowhere", "espeak:en-us:rate=fast",
    "espeak::rate=100", "espeak:en-us:rate=100:rate=120", "espeak:en-us:voice=en-gb",
    "no_such_module_anywhere:Engine", "os:NoSuchEngine", "justaword", "os.path:join", "not a module:X",
    "collections:OrderedDict",
])
def test_make_tts_rejects_bad_specs(spec):
    with pytest.raises(ValueError):
        make_tts(spec)


def test_make_tts_loads_a_user_supplied_engine(tmp_path, monkeypatch):
    (tmp_path / "my_neural_tts.py").write_text(textwrap.dedent("""
        import numpy as np

        class ToneTTS:
            def __init__(self, sample_rate=16000, tone=440.0, loud=False):
                self.sample_rate = sample_rate
                self.tone = tone
                self.loud = loud
                self.name = f"tone:{tone}"

            def synthesize(self, text):
                t = np.arange(int(0.1 * len(text) * self.sample_rate)) / self.sample_rate
                return (0.5 * np.sin(2 * np.pi * self.tone * t)).astype(np.float32)

        class NotATTS:
            name = "nope"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    engine = make_tts("my_neural_tts:ToneTTS:sample_rate=8000:tone=220.5:loud=true")
    assert isinstance(engine, TTS)
    assert (engine.sample_rate, engine.tone, engine.loud, engine.name) == (8000, 220.5, True, "tone:220.5")
    assert engine.synthesize("cat").size == 2400
    with pytest.raises(ValueError, match="TTS interface"):
        make_tts("my_neural_tts:NotATTS")
    with pytest.raises(ValueError, match="ToneTTS"):
        make_tts("my_neural_tts:ToneTTS:volume=3")


def test_missing_library_is_a_clear_runtime_error(monkeypatch):
    import espeakng_loader

    monkeypatch.setattr(espeakng_loader, "get_library_path", lambda: "/nonexistent/libespeak-ng.so")
    with pytest.raises(RuntimeError, match="espeak-ng library not found"):
        tts._locate_espeak()


def test_threads_building_voices_and_phonemizing_at_once_get_what_one_thread_gets():
    """espeak-ng is one global state machine: model6asr's ASR workers phonemize from several
    threads, and building an engine (which lists espeak's voices) must hold the lock too; without
    it a thread saw "espeak-ng has no voice 'en-us'"."""
    words = ["cat", "koovnorb", "seven", "the boy can jump high", "cowboy", "snofgemtusk"] * 4
    voices = ["en-us", "en-gb", "en-us+f3", "en"]
    serial = [tts.EspeakTTS(voice=voices[i % 4]).phonemize(w) for i, w in enumerate(words)]
    for _ in range(3):
        engine = tts._engine()
        engine._voice_names = engine._variant_names = None  # the next engine lists the voices again
        tts._phonemizer.cache_clear()
        with ThreadPoolExecutor(8) as pool:
            threaded = list(pool.map(lambda k: tts.EspeakTTS(voice=voices[k % 4]).phonemize(words[k]),
                                     range(len(words))))
        assert threaded == serial
