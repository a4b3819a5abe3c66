"""Text-to-speech behind one small interface, with an espeak-ng engine that needs no network.

The scorer compares a child's recording with a synthesized rendering of the expected
response, so every engine is identified by a stable ``name`` (engine + settings) that is
used in feature cache keys. espeak-ng is the built-in engine: it ships inside the PyPI
package ``espeakng-loader`` (shared library + voice data) and is driven through ctypes.
A neural engine can be plugged in with ``make_tts("my.module:MyTTS")``.

Reproducibility: espeak-ng keeps synthesis state in C statics (pitch flutter phase,
gain control) that survive ``espeak_Terminate``/``espeak_Initialize``, and seeds its
noise generator (used by breathy voices such as "+f2") from the clock, so the same text
could come out slightly different depending on what was said before and when. By
default every ``synthesize`` therefore starts from a freshly loaded private copy of the
library with a fixed noise seed (about 2-3 ms extra), which makes the audio a pure
function of (text, settings) -- what a cache key promises, and what the demo data needs
to be byte-identical however the work is split between processes.
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import importlib
import os
import shutil
import tempfile
import threading
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "TTS",
    "EspeakTTS",
    "phonemize",
    "espeak_voices",
    "espeak_variants",
    "make_tts",
]


@runtime_checkable
class TTS(Protocol):
    """What the rest of the package needs from a speech synthesizer."""

    name: str  # stable id of engine + settings; part of cache keys, so change it when the sound changes
    sample_rate: int

    def synthesize(self, text: str) -> np.ndarray:
        """Float32 mono audio in [-1, 1] at ``self.sample_rate``."""
        ...


# --- espeak-ng C API constants (speak_lib.h) -------------------------------------------
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # without it a bad data path makes the library call exit()
_BUFFER_MS = 200  # length of the chunks handed to the callback; does not change the audio
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PHONEMES = 0x100  # honour [[...]] phoneme mnemonics in the text
_IPA = 0x02  # espeak_TextToPhonemes phonememode bit 1
_PHONEME_SEPARATOR = "_"  # goes in phonememode bits 8-23; keeps "aɪ", "tʃ", "ɔːɹ" in one piece
_STRESS_MARKS = str.maketrans("", "", "ˈˌ',")
_EE_OK = 0
_RAND_SEED = 1

_RATE, _VOLUME, _PITCH, _RANGE, _WORDGAP = 1, 2, 3, 4, 7

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _EspeakVoice(ctypes.Structure):
    # languages is a packed list of (priority byte, NUL-terminated code), so it stays a raw pointer
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


# espeak-ng is one global state machine: every call into it, from any EspeakTTS, holds this.
_LOCK = threading.RLock()


def _new_lock_after_fork() -> None:
    global _LOCK  # a thread of the parent may have held it at fork time; it never will release
    _LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_after_fork)


def _locate_espeak() -> tuple[str, str]:
    """(library path, data path) from espeakng-loader, or a RuntimeError saying what to install."""
    try:
        import espeakng_loader
    except ImportError as exc:
        raise RuntimeError(
            "espeak-ng is not available: install the PyPI package 'espeakng-loader'"
        ) from exc
    library = espeakng_loader.get_library_path()
    try:
        data = espeakng_loader.get_data_path()
    except Exception as exc:
        raise RuntimeError(f"espeakng-loader has no espeak-ng-data folder: {exc}") from exc
    if not os.path.isfile(library):
        raise RuntimeError(f"espeak-ng library not found at {library} (reinstall espeakng-loader)")
    if not os.path.isdir(data):
        raise RuntimeError(f"espeak-ng data not found at {data} (reinstall espeakng-loader)")
    return library, data


def _declare(lib: ctypes.CDLL) -> None:
    """Argument and return types, so ctypes neither truncates pointers nor guesses ints."""
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
        ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synchronize.argtypes = []
    lib.espeak_Synchronize.restype = ctypes.c_int
    lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
    lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
    lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_EspeakVoice)]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_EspeakVoice))
    lib.espeak_Terminate.argtypes = []
    lib.espeak_Terminate.restype = ctypes.c_int


_COPY_PREFIX = "readaloud-espeak-"


def _remove_directory(path: str, owner: int) -> None:
    if os.getpid() == owner:  # a forked child exiting must not delete its parent's copy
        shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's process; or no way to tell: leave its copy alone
        return True
    return True


def _sweep_orphaned_copies(temp_dir: str) -> int:
    """Delete library copies whose process is gone (killed before its atexit ran: a timeout,
    an OOM kill, a test worker torn down). Copies are named ``readaloud-espeak-<pid>-*``;
    returns how many were removed."""
    removed = 0
    try:
        names = os.listdir(temp_dir)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(_COPY_PREFIX):
            continue
        pid_text = name[len(_COPY_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue
        shutil.rmtree(os.path.join(temp_dir, name), ignore_errors=True)
        removed += 1
    return removed


def _unload(handle: int) -> None:
    import _ctypes

    if hasattr(_ctypes, "dlclose"):
        _ctypes.dlclose(handle)
    else:  # Windows
        _ctypes.FreeLibrary(handle)


class _Espeak:
    """A private copy of libespeak-ng, initialised in this process.

    Loading a copy (as phonemizer does) means nobody else in the process shares our global
    state, and unloading it really resets the C statics when a clean start is wanted.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._source, self._data_path = _locate_espeak()
        self._copy_library()
        self._callback = _SYNTH_CALLBACK(self._collect)  # kept referenced: C holds only the pointer
        self._audio = bytearray()
        self._lib: ctypes.CDLL | None = None
        self._dirty = False  # True once synthesis state may differ from a fresh load
        self._voice: str | None = None  # the voice last selected in this load of the library
        self._voice_names: dict[str, str] | None = None
        self._variant_names: dict[str, str] | None = None
        self.sample_rate = self._load()

    # -- lifecycle -------------------------------------------------------------------------
    def _load(self) -> int:
        try:
            lib = ctypes.CDLL(self._library)
        except OSError as exc:
            raise RuntimeError(f"cannot load the espeak-ng library ({exc})") from exc
        _declare(lib)
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, os.fsencode(self._data_path), _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            _unload(lib._handle)
            raise RuntimeError(f"espeak-ng failed to initialise with data at {self._data_path}")
        lib.espeak_SetSynthCallback(self._callback)
        if hasattr(lib, "espeak_ng_SetRandSeed"):
            # initialisation seeds espeak's noise generator (breathy voices) with time(NULL)
            lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
            lib.espeak_ng_SetRandSeed.restype = None
            lib.espeak_ng_SetRandSeed(_RAND_SEED)
        self._lib = lib
        self._dirty = False
        self._voice = None
        return rate

    def _copy_library(self) -> None:
        """A copy owned (and deleted at exit) by this process; copies left by killed processes
        are swept first, so /tmp does not fill up with them."""
        _sweep_orphaned_copies(tempfile.gettempdir())
        self._dir = tempfile.mkdtemp(prefix=f"{_COPY_PREFIX}{os.getpid()}-")
        atexit.register(_remove_directory, self._dir, os.getpid())
        self._library = os.path.join(self._dir, os.path.basename(self._source))
        shutil.copyfile(self._source, self._library)

    def _reload(self) -> None:
        lib, self._lib = self._lib, None
        if lib is not None:
            lib.espeak_Terminate()
            _unload(lib._handle)
        self._load()

    def after_fork(self) -> None:
        """In a forked child: start from a fresh load of the parent's copy (no new file to
        leak if the child ends with os._exit), or of a new copy once the parent removed it."""
        self.pid = os.getpid()
        if not os.path.exists(self._library):
            self._copy_library()
        self._dirty = True
        self._reload()

    def _collect(self, wav, n_samples: int, _events) -> int:
        if n_samples > 0 and wav:
            self._audio += ctypes.string_at(wav, 2 * n_samples)
        return 0  # 0 = go on synthesizing

    # -- voices ------------------------------------------------------------------------------
    def _list(self, spec: _EspeakVoice | None) -> list[_EspeakVoice]:
        voices = self._lib.espeak_ListVoices(ctypes.byref(spec) if spec is not None else None)
        found, i = [], 0
        while voices and voices[i]:
            found.append(voices[i].contents)
            i += 1
        return found

    def voice_names(self) -> dict[str, str]:
        """Lower-case voice name or language code -> the name espeak_SetVoiceByName accepts."""
        if self._voice_names is None:
            names: dict[str, str] = {}
            codes: dict[str, str] = {}
            for voice in self._list(None):
                if not voice.identifier:
                    continue
                file_name = os.path.basename(voice.identifier.decode()).lower()
                if file_name.startswith("mb-"):  # mbrola voices need a separate install
                    continue
                names[file_name] = file_name
                for code in _language_codes(voice.languages):
                    codes.setdefault(code.lower(), file_name)
            self._voice_names = {**codes, **names}
        return self._voice_names

    def variant_names(self) -> dict[str, str]:
        """Lower-case variant name -> its file name (variant files are case-sensitive)."""
        if self._variant_names is None:
            label = ctypes.create_string_buffer(b"variant")  # espeak's way to ask for variants
            spec = _EspeakVoice()
            spec.languages = ctypes.addressof(label)
            names = {}
            for voice in self._list(spec):
                file_name = voice.identifier.decode().rsplit("/", 1)[-1]
                names[file_name.lower()] = file_name
            self._variant_names = names
        return self._variant_names

    def resolve_voice(self, voice: str) -> str:
        """'en-GB+F3' -> 'en+f3': a name espeak_SetVoiceByName accepts, or ValueError."""
        base, plus, variant = voice.strip().partition("+")
        resolved = self.voice_names().get(base.strip().lower())
        if resolved is None:
            raise ValueError(f"espeak-ng has no voice {base!r}; see readaloud.tts.espeak_voices()")
        if plus:
            variant_file = self.variant_names().get(variant.strip().lower())
            if variant_file is None:
                raise ValueError(
                    f"espeak-ng has no voice variant {variant!r}; see readaloud.tts.espeak_variants()"
                )
            resolved += "+" + variant_file
        return resolved

    # -- work ------------------------------------------------------------------------------
    def _select(self, voice: str) -> None:
        if voice == self._voice:  # loading a voice re-reads its dictionary: ~3 ms
            return
        self._voice = None
        if self._lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            raise ValueError(f"espeak-ng could not load voice {voice!r}")
        self._voice = voice

    def synthesize(self, voice: str, parameters: dict[int, int], text: str, fresh: bool) -> np.ndarray:
        if fresh and self._dirty:
            self._reload()
        self._dirty = True
        self._select(voice)
        for parameter, value in parameters.items():
            if self._lib.espeak_SetParameter(parameter, value, 0) != _EE_OK:
                raise RuntimeError(f"espeak_SetParameter({parameter}, {value}) failed")
        self._audio = bytearray()
        data = text.encode("utf-8")
        status = self._lib.espeak_Synth(
            data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _PHONEMES, None, None
        )
        if status != _EE_OK or self._lib.espeak_Synchronize() != _EE_OK:
            raise RuntimeError(f"espeak-ng failed to synthesize {text!r} (status {status})")
        samples = np.frombuffer(bytes(self._audio), dtype=np.int16)
        self._audio = bytearray()
        return samples.astype(np.float32) / 32768.0

    def phonemes(self, voice: str, text: str, ipa: bool) -> list[str]:
        self._dirty = True
        self._select(voice)
        mode = (_IPA if ipa else 0) | (ord(_PHONEME_SEPARATOR) << 8)
        buffer = ctypes.create_string_buffer(text.encode("utf-8"))
        pointer = ctypes.c_void_p(ctypes.addressof(buffer))
        tokens: list[str] = []
        while pointer.value:  # one clause per call; the pointer becomes NULL after the last
            clause = self._lib.espeak_TextToPhonemes(ctypes.byref(pointer), _CHARS_UTF8, mode)
            if not clause:
                break
            for word in clause.decode("utf-8").split():
                for token in word.split(_PHONEME_SEPARATOR):
                    token = token.translate(_STRESS_MARKS)
                    if token:
                        tokens.append(token)
        return tokens


def _language_codes(address: int | None) -> list[str]:
    """Decode espeak_VOICE.languages: repeated (priority byte, code, NUL), ended by a 0 byte."""
    codes = []
    while address:
        priority = ctypes.string_at(address, 1)[0]
        if priority == 0:
            break
        code = ctypes.string_at(address + 1)
        codes.append(code.decode("utf-8", "replace"))
        address += 2 + len(code)
    return codes


_ENGINE: _Espeak | None = None


def _engine() -> _Espeak:
    """The process's espeak-ng (re-created after a fork, so each process initialises its own)."""
    global _ENGINE
    with _LOCK:
        if _ENGINE is None:
            _ENGINE = _Espeak()
        elif _ENGINE.pid != os.getpid():
            _ENGINE.after_fork()
        return _ENGINE


def _check_range(label: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{label} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{label} must be in [{low}, {high}], got {value}")
    return int(value)


class EspeakTTS:
    """espeak-ng through ctypes: fast, offline, many accents and voice variants.

    ``voice`` is a voice or language code (``espeak_voices()``), optionally with a variant
    (``espeak_variants()``) after a '+', e.g. "en-us+f3". ``rate`` is in words per minute,
    ``pitch`` and ``pitch_range`` are 0-99 (50 = the voice's normal), ``volume`` is 0-200
    (100 = normal) and ``word_gap`` adds pauses between words in units of 10 ms.

    Text may contain espeak phoneme mnemonics in double brackets, e.g. "[[k@]]" (a /k/ as
    a child sounds it out), which is how the demo data says isolated speech sounds.
    With ``reproducible=False`` synthesis skips the library reload (see the module
    docstring): slightly faster, but the output then depends a little on what was
    synthesized before.
    """

    _DEFAULTS = {"rate": 165, "pitch": 50, "pitch_range": 50, "volume": 100, "word_gap": 0}

    def __init__(
        self,
        voice: str = "en-us+f3",
        rate: int = 165,
        pitch: int = 50,
        pitch_range: int = 50,
        volume: int = 100,
        word_gap: int = 0,
        *,
        reproducible: bool = True,
    ) -> None:
        if not isinstance(voice, str) or not voice.strip():
            raise ValueError(f"voice must be a non-empty string, got {voice!r}")
        self.voice = voice.strip()
        self.rate = _check_range("rate", rate, 80, 450)
        self.pitch = _check_range("pitch", pitch, 0, 99)
        self.pitch_range = _check_range("pitch_range", pitch_range, 0, 99)
        self.volume = _check_range("volume", volume, 0, 200)
        self.word_gap = _check_range("word_gap", word_gap, 0, 1000)
        self.reproducible = bool(reproducible)
        with _LOCK:  # resolving lists espeak's voices: a call into its global state like any other
            engine = _engine()
            self._espeak_voice = engine.resolve_voice(self.voice)  # unknown voices fail here, not later
            self.sample_rate = engine.sample_rate
        self._parameters = {
            _RATE: self.rate,
            _VOLUME: self.volume,
            _PITCH: self.pitch,
            _RANGE: self.pitch_range,
            _WORDGAP: self.word_gap,
        }
        name = f"espeak:{self.voice}:r{self.rate}:p{self.pitch}"
        for label, key in (("pr", "pitch_range"), ("v", "volume"), ("g", "word_gap")):
            if getattr(self, key) != self._DEFAULTS[key]:  # defaults stay out so names stay short
                name += f":{label}{getattr(self, key)}"
        self.name = name

    def __repr__(self) -> str:
        return f"EspeakTTS({self.name!r})"

    def synthesize(self, text: str) -> np.ndarray:
        """Float32 mono audio at ``sample_rate`` (22050 Hz); leading/trailing silence is kept."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("cannot synthesize empty text")
        with _LOCK:
            return _engine().synthesize(self._espeak_voice, self._parameters, text, self.reproducible)

    def phonemize(self, text: str, *, ipa: bool = True) -> list[str]:
        """Phoneme tokens of ``text`` in this voice's accent, e.g. "cat" -> ["k", "æ", "t"].

        Stress marks and word boundaries are dropped; length marks stay on their vowel and
        multi-letter phonemes ("aɪ", "tʃ") are single tokens. ``ipa=False`` gives espeak's
        ASCII mnemonics instead ("k", "a", "t"), which can be spoken back as "[[k]]".
        Empty text gives an empty list.
        """
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        if not text.strip():
            return []
        with _LOCK:
            return _engine().phonemes(self._espeak_voice, text, ipa)


@functools.lru_cache(maxsize=16)
def _phonemizer(voice: str) -> EspeakTTS:
    return EspeakTTS(voice=voice)


def phonemize(text: str, voice: str = "en-us") -> list[str]:
    """IPA phoneme tokens of ``text`` (see ``EspeakTTS.phonemize``) with a cached engine."""
    return _phonemizer(voice).phonemize(text)


def espeak_voices(language_prefix: str = "en") -> list[str]:
    """Voice names (language codes such as "en-us", "en-gb", "en-029") usable as ``voice``.

    An empty prefix lists every language espeak-ng knows.
    """
    prefix = language_prefix.lower()
    with _LOCK:
        names = _engine().voice_names()
    return sorted(name for name in names if name.startswith(prefix))


def espeak_variants() -> list[str]:
    """Variant names usable after a '+' in a voice, e.g. "f1".."f5", "m1".."m8", "klatt"."""
    with _LOCK:
        return sorted(_engine().variant_names().values(), key=str.lower)


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _parse_options(spec: str, fields: list[str]) -> dict[str, Any]:
    options = {}
    for field in fields:
        key, equals, value = field.partition("=")
        key = key.strip()
        if not equals or not key.isidentifier():
            raise ValueError(f"bad TTS spec {spec!r}: expected key=value, got {field!r}")
        if key in options:
            raise ValueError(f"bad TTS spec {spec!r}: {key!r} given twice")
        options[key] = _parse_value(value.strip())
    return options


def make_tts(spec: str) -> TTS:
    """Build a TTS from a one-line spec (what a config file or command line carries).

    - ``"espeak"``, ``"espeak:VOICE"``, ``"espeak:VOICE:rate=170:pitch=60"`` -> EspeakTTS
      (``"espeak:rate=170"`` keeps the default voice);
    - ``"piper"``, ``"piper:voice=en_US-joe-medium:length_scale=1.1"`` -> readaloud.piper_tts.PiperTTS;
    - ``"package.module:ClassName"`` with optional ``":key=value"`` arguments imports a
      user-supplied engine (e.g. a neural TTS) and instantiates it with those arguments.
      Values are parsed as bool, int or float when they look like one.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty TTS spec; try 'espeak' or 'espeak:en-us+f3'")
    fields = [field.strip() for field in spec.strip().split(":")]
    head, rest = fields[0], fields[1:]
    if head.lower() == "espeak":
        kwargs: dict[str, Any] = {}
        if rest and "=" not in rest[0]:
            voice, rest = rest[0], rest[1:]
            if not voice:
                raise ValueError(f"bad TTS spec {spec!r}: empty voice")
            kwargs["voice"] = voice
        options = _parse_options(spec, rest)
        if "voice" in options and "voice" in kwargs:
            raise ValueError(f"bad TTS spec {spec!r}: voice given twice")
        kwargs.update(options)
        try:
            return EspeakTTS(**kwargs)
        except TypeError as exc:  # an unknown keyword
            raise ValueError(f"bad TTS spec {spec!r}: {exc}") from exc

    if head.lower() == "piper":  # the neural voice of readaloud.piper_tts, e.g. "piper:voice=en_US-joe-medium"
        return make_tts(":".join(["readaloud.piper_tts", "PiperTTS", *rest]))
    if not rest or not rest[0]:
        raise ValueError(
            f"bad TTS spec {spec!r}: expected 'espeak[:VOICE][:key=value...]' "
            "or 'package.module:ClassName[:key=value...]'"
        )
    module_name, class_name = head, rest[0]
    if not all(part.isidentifier() for part in module_name.split(".")) or not class_name.isidentifier():
        raise ValueError(f"bad TTS spec {spec!r}: {module_name!r}:{class_name!r} is not module:Class")
    options = _parse_options(spec, rest[1:])
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"bad TTS spec {spec!r}: cannot import {module_name!r} ({exc})") from exc
    cls = getattr(module, class_name, None)
    if cls is None or not callable(cls):
        raise ValueError(f"bad TTS spec {spec!r}: {module_name} has no class {class_name!r}")
    try:
        tts = cls(**options)
    except TypeError as exc:
        raise ValueError(f"bad TTS spec {spec!r}: {class_name}({options}) failed: {exc}") from exc
    if not isinstance(tts, TTS):
        raise ValueError(
            f"bad TTS spec {spec!r}: {class_name} lacks the TTS interface "
            "(attributes name and sample_rate, method synthesize(text))"
        )
    return tts
