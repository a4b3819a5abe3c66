"""ASR evidence for the gradient-boosted member: what a pretrained Whisper hears in a clip, and how
likely it finds the expected text, as a fixed vector of numbers per (clip, expected text).

Runs a CTranslate2 Whisper folder (`ctranslate2.models.Whisper`; int8 on CPU, float16 on CUDA).
Per clip: Whisper's log-mel of the audio zero-padded to a window of 10 s, or the next multiple of
10 s that holds the clip, at most 30 s (`AsrSettings.window_s`, features.whisper_window_s; Whisper
was trained on 30 s windows, CTranslate2 also takes shorter ones; a 10 s window is much faster and
kept the children's scores: docs/benchmarks.md, "Children reading aloud", the 10 s window), the encoder run once, then

- the greedy transcript (beam 1, no timestamps, English prompt: <|startoftranscript|>
  <|notimestamps|> for English-only models, <|startoftranscript|><|en|><|transcribe|>
  <|notimestamps|> for multilingual ones; ids read from the tokenizer);
- teacher forcing (`Whisper.align`, same encoder output) of the transcript's own tokens and of the
  expected text's: per-token probabilities, softmax over the text tokens only (CTranslate2's
  `text_token_probs`). The expected text is written the way Whisper writes: where a stretch of it
  agrees with the transcript after normalisation ("seven" / "7,", "kate" / "Kate"), Whisper's own
  spelling of that stretch is used, elsewhere the expected words as given (first letter of the
  sentence capitalised), then a sentence-final mark whose log p says whether the text ends there.
- optionally (`ClosedRequest`, members/gbm/closed.py) a greedy decode over the task's words only, whose
  tokens are teacher-forced in the same pass (`ClosedTranscript`).

`FEATURES` lists the numbers and what each means. Per-word log p (the sum over a word's BPE tokens)
is kept beside them for explanations. `asr_table` does a whole metadata table, batched, with a
progress bar, reading and filling a per-data-folder cache: one decode per clip, one teacher-forced
pass per (clip, expected text).
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import pandas as pd
import tokenizers
from tqdm.auto import tqdm

from ...audio import AudioError, load_audio
from ...features import FeatureParams, merge_npz_cache, read_npz_cache, whisper_window_s, window_log_mel
from ...layout import cache_dir
from ...text import text_units
from ...whisper.asr import (SENTENCE_MARKS, available_cores, ct2_engine, load_ct2_whisper, model_identity,
                            render_expected, resolve_device)
from ...whisper.backbones import NAMED_BACKBONES, ct2_model_dir
from ...normalise import edit_distance, normalise_tokens, spoken_text, surface_words

log = logging.getLogger("readaloud")

ASR_VERSION = 2
CPU_BATCH = 1    # clips per encoder call on CPU: 30 s windows ran fastest one at a time (2 cores)
CUDA_BATCH = 16
T, R = TypeVar("T"), TypeVar("R")
ALIGN_FRAMES = 2  # num_frames for Whisper.align: one encoder position of timing work (_aligned_logprobs)
LOW_WORD_P = 0.1  # an expected word less likely than this counts as "low" in exp_low_word_frac

FEATURES: dict[str, str] = {
    "exact_match": "1 if the normalised transcript equals the normalised expected text, else 0",
    "word_edits": "word edit distance between the normalised transcript and expected text",
    "word_edit_rate": "word_edits / number of normalised expected words",
    "char_edits": "character edit distance between the two normalised texts (words joined by spaces)",
    "char_edit_rate": "char_edits / characters of the normalised expected text",
    "phone_edits": "espeak-phoneme edit distance of transcript vs expected (nonwords have no spelling "
                   "Whisper knows, but sound alike)",
    "phone_edit_rate": "phone_edits / phonemes of the expected text",
    "n_expected_words": "normalised expected words",
    "len_diff": "normalised transcript words minus expected words (> 0: words added, < 0: dropped)",
    "exp_mean_logp": "teacher-forced mean log p of the expected text's BPE tokens",
    "exp_min_logp": "log p of its least likely token",
    "exp_sum_logp": "sum of its tokens' log p",
    "exp_min_word_logp": "log p of the least likely expected word (sum over the word's tokens)",
    "exp_low_word_frac": f"share of expected words with p < {LOW_WORD_P}",
    "end_logp": "log p of the sentence-final mark right after the expected text (low: it goes on)",
    "tr_mean_logp": "teacher-forced mean log p of the transcript's own tokens (NaN: empty transcript)",
    "tr_sum_logp": "sum of the transcript tokens' log p",
    "margin_mean_logp": "exp_mean_logp - tr_mean_logp: how much less likely the expected text is "
                        "than what Whisper heard",
    "margin_sum_logp": "exp_sum_logp - tr_sum_logp",
    "gen_avg_logprob": "the greedy decode's score (mean log p with end of text, full vocabulary)",
    "no_speech_prob": "Whisper's probability that the clip holds no speech",
}
FEATURE_NAMES: list[str] = list(FEATURES)
CLIP_STATS = ("gen_avg_logprob", "no_speech_prob", "tr_mean_logp", "tr_sum_logp")


@dataclass(frozen=True)
class AsrSettings:
    """How clips are decoded; part of the cache's name, so changing it recomputes."""
    window_s: float = 10.0   # shortest padded window; longer clips get the next multiple, up to 30 s
                             # (features.whisper_window_s; Whisper's training window is 30 s)
    max_length: int = 128    # CTranslate2's max_length (a hallucinating loop stops here; ctranslate2 4.x
                             # writes at most max_length // 2 tokens: 64 here, measured)

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": ASR_VERSION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:8]


@dataclass
class ClosedTranscript:
    """A closed-vocabulary transcript (members/gbm/closed.py) and the teacher-forced log p of its tokens
    on the same encoder output (softmax over text tokens, as tr_mean_logp; NaN: empty transcript):
    how sure Whisper is of the nearest task words it could write."""
    text: str
    mean_logp: float = float("nan")
    sum_logp: float = float("nan")


@dataclass
class ClipDecode:
    """What the greedy decode says about one clip (independent of any expected text)."""
    transcript: str
    token_ids: list[int]
    stats: dict[str, float]
    closed: dict[str, ClosedTranscript] = field(default_factory=dict)  # request key -> closed transcript
                                                                       # (members/gbm/closed.py; cached there)
    text_only: bool = False   # decoded in this pass and every token written was text (no token past end of
                              # text): token_ids is the whole sequence, so closed_equals_open may judge it
    prompted: dict[str, list[np.ndarray]] = field(default_factory=dict)  # request key -> log p of each of its
                                                                          # texts (members/gbm/prompted.py)


@dataclass(frozen=True)
class PromptRequest:
    """Teacher forcing after a prompt, asked of one clip (members/gbm/prompted.py builds them): `key` names
    the prompt, `texts` are the expected texts and `sequences` their token ids."""
    key: str
    prompt: tuple[int, ...]
    texts: tuple[str, ...]
    sequences: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class ClosedRequest:
    """A closed-vocabulary decode asked of one clip (members/gbm/closed.py builds them): `vocabulary`
    names the allowed words, `suppress` the ids it may not write, `max_length` CTranslate2's limit
    for it; `key`, both names together, is the transcript's cache key."""
    vocabulary: str
    suppress: list[int]
    max_length: int

    @property
    def key(self) -> str:
        return f"{self.vocabulary}.L{self.max_length}"


@dataclass
class RowEvidence:
    """The evidence for one (clip, expected text): the feature vector and per-word log p."""
    features: np.ndarray                   # float32 [len(FEATURE_NAMES)]
    words: list[tuple[str, float]]         # (expected surface word, its log p)
    transcript: str = ""


@dataclass
class AsrTable:
    """`asr_table`'s result, row for row with the metadata."""
    X: np.ndarray                          # float32 [rows, len(FEATURE_NAMES)], NaN where not ok
    ok: np.ndarray                         # bool [rows]: the clip could be read and scored
    transcripts: list[str] = field(default_factory=list)
    words: list[list[tuple[str, float]]] = field(default_factory=list)


class WhisperEvidence:
    """A CTranslate2 Whisper and its tokenizer, turning batches of clips into `RowEvidence`."""

    def __init__(self, model: str | Path, device: str = "auto", compute_type: str = "auto",
                 threads: int = 0, settings: AsrSettings = AsrSettings(), workers: int = 0):
        """`threads`: CPU threads in all (0: the cores this process may use). `workers`: clips run at
        once, each on threads // workers threads (0: one worker per thread on CPU, one on CUDA). One
        clip at a time per thread beats one clip on all threads (Whisper's batch-1 kernels leave
        cores idle; docs/members.md, "ASR workers: one clip per thread"), and the evidence does not depend on
        the thread count. Callers that want the parallelism go through `map_clips`."""
        self.name = str(model) if str(model) in NAMED_BACKBONES else Path(model).name
        self.model_dir = ct2_model_dir(str(model)) if str(model) in NAMED_BACKBONES else Path(model)
        missing = [n for n in ("model.bin", "config.json", "tokenizer.json") if not (self.model_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.model_dir}: not a CTranslate2 Whisper folder (missing "
                                    f"{', '.join(missing)})")
        self.settings = settings
        self.device, self.compute_type = resolve_device(device, compute_type)
        self.batch_size = CPU_BATCH if self.device == "cpu" else CUDA_BATCH
        threads = threads if threads > 0 else available_cores()
        self.workers = max(1, workers if workers > 0 else threads if self.device == "cpu" else 1)
        self.model = load_ct2_whisper(self.model_dir, self.device, self.compute_type, self.workers,
                                      max(1, threads // self.workers))
        self.tokenizer = tokenizers.Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self.eot = self._special("<|endoftext|>")
        sot, no_timestamps = self._special("<|startoftranscript|>"), self._special("<|notimestamps|>")
        language = [self._special("<|en|>"), self._special("<|transcribe|>")] if self.model.is_multilingual else []
        self.start_sequence = [sot, *language]          # align() adds <|notimestamps|> itself
        self.prompt = [*self.start_sequence, no_timestamps]
        self.params = FeatureParams(n_mels=self.model.n_mels)
        # what generate(suppress_tokens=[-1]) suppresses: the open decode never writes these
        config = json.loads((self.model_dir / "config.json").read_text())
        self.default_suppressed = tuple(int(t) for t in config.get("suppress_ids", []))
        self._closed_allowed: dict[str, np.ndarray | None] = {}   # vocabulary key -> allowed ids (closed_equals_open)
        self.identity = (f"{self.name}_{model_identity(self.model_dir)}_{self.compute_type}_{settings.key()}")

    def _special(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.model_dir}/tokenizer.json has no {token} token")
        return token_id

    # -- audio in, encoder out --
    def window_s(self, audio: np.ndarray) -> float:
        return whisper_window_s(audio.size, self.settings.window_s)

    def window_features(self, audio: np.ndarray) -> np.ndarray:
        """[n_mels, frames] log-mel of `audio` cut or zero-padded to its window, as Whisper does."""
        return window_log_mel(audio, self.window_s(audio), self.params)

    def encode(self, audios: list[np.ndarray]):
        """Encoder output of clips that share one window size (`evidence` groups them)."""
        mels = np.stack([self.window_features(a) for a in audios])
        return self.model.encode(ct2_engine().StorageView.from_array(mels), to_cpu=True)

    def decode(self, encoded) -> list[ClipDecode]:
        """Greedy transcripts of encoded clips (beam 1, no timestamps)."""
        results = self.model.generate(encoded, [self.prompt] * encoded.shape[0], beam_size=1,
                                      max_length=self.settings.max_length, return_scores=True,
                                      return_no_speech_prob=True)
        out = []
        for r in results:
            ids = [t for t in r.sequences_ids[0] if t < self.eot]
            out.append(ClipDecode(self.tokenizer.decode(ids).strip(), ids,
                                  {"gen_avg_logprob": float(r.scores[0]), "no_speech_prob": float(r.no_speech_prob)},
                                  text_only=len(ids) == len(r.sequences_ids[0])))
        return out

    def closed_equals_open(self, request: ClosedRequest, decode: ClipDecode) -> bool:
        """Whether the closed decode `request` must write what the open decode wrote, so it need not
        run. Greedy decoding takes the best allowed token at each step; when every token the open
        decode took is allowed in the closed one, the best token is allowed at every step and both
        write the same sequence, provided the closed decode allows nothing the open one suppresses
        (the model's default suppressed symbols) and its length limit leaves room for the whole open
        sequence and its end of text (judged as if max_length counted tokens, though ctranslate2 4.x
        writes only half as many: never a shortcut too many). Same encoder output, same batch of one,
        same logits: bit for bit (tests/test_closed_vocab.py)."""
        if not decode.text_only or len(decode.token_ids) + 1 > request.max_length // 2:
            return False
        if request.vocabulary not in self._closed_allowed:   # one mask per vocabulary, whatever the limits
            mask = np.ones(self.tokenizer.get_vocab_size(), bool)
            mask[np.asarray(request.suppress, np.int64)] = False
            # a token the open decode could never write is allowed in the closed one: no shortcut
            exact = not mask[[t for t in self.default_suppressed if t < mask.size]].any()
            self._closed_allowed[request.vocabulary] = mask if exact else None
        mask = self._closed_allowed[request.vocabulary]
        return mask is not None and bool(mask[decode.token_ids].all()) and bool(mask[self.eot])

    def closed_sequences(self, encoded, request: ClosedRequest) -> list[list[int]]:
        """Greedy token ids (text only) of encoded clips that never write a suppressed token and stop
        at the request's length limit (members/gbm/closed.py)."""
        results = self.model.generate(encoded, [self.prompt] * encoded.shape[0], beam_size=1,
                                      max_length=min(request.max_length, self.settings.max_length),
                                      suppress_tokens=request.suppress, suppress_blank=True)
        return [[t for t in r.sequences_ids[0] if t < self.eot] for r in results]

    def closed_decode(self, encoded, request: ClosedRequest) -> list[str]:
        """The closed transcripts of encoded clips (closed_sequences as text)."""
        return [self.tokenizer.decode(ids).strip() for ids in self.closed_sequences(encoded, request)]

    def closed_transcripts(self, encoded: np.ndarray, rows: list[int],
                           sequences: list[list[int]]) -> list[ClosedTranscript]:
        """ClosedTranscript of each closed token sequence, teacher-forced on encoder output rows[k]."""
        logps = self.token_logprobs(encoded, rows, sequences)
        return [closed_transcript(self.tokenizer.decode(ids).strip(), lp) for ids, lp in zip(sequences, logps)]

    def token_logprobs(self, encoded: np.ndarray, rows: list[int], sequences: list[list[int]]) -> list[np.ndarray]:
        """Teacher-forced log p of each token sequence given encoder output row rows[k]. A (row,
        sequence) pair asked for twice is aligned once: a transcript that spells the expected text
        as the rendering does is the same sequence on the same clip."""
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(sequences)
        first: dict[tuple[int, tuple[int, ...]], int] = {}
        for k, s in enumerate(sequences):
            if s:
                first.setdefault((rows[k], tuple(s)), k)
        todo = list(first.values())
        if not todo:
            return out
        logps = self._aligned_logprobs(encoded[[rows[k] for k in todo]], self.start_sequence,
                                       [sequences[k] for k in todo])
        for k, lp in zip(todo, logps):
            out[k] = lp.astype(np.float32)
        for k, s in enumerate(sequences):
            if s and first[(rows[k], tuple(s))] != k:
                out[k] = out[first[(rows[k], tuple(s))]]
        return out

    def prompted_logprobs(self, encoded: np.ndarray, row: int, prompt: list[int] | tuple[int, ...],
                          sequences: list[list[int]] | tuple[tuple[int, ...], ...]) -> list[np.ndarray]:
        """Teacher-forced log p of each token sequence after `prompt` (previous text, see
        members/gbm/prompted.py), given encoder output row `row`."""
        if not sequences:
            return []
        return self._aligned_logprobs(np.repeat(encoded[row: row + 1], len(sequences), 0),
                                      [*prompt, *self.start_sequence], [list(s) for s in sequences])

    def _aligned_logprobs(self, encoded: np.ndarray, start: list[int], sequences: list[list[int]]) -> list[np.ndarray]:
        """float64 log p of sequences[k]'s tokens after `start`, teacher-forced on encoder output row k.
        `align` also times each token against the audio (softmax, median filter and DTW over
        `num_frames` // 2 encoder positions of its cross-attention), which nothing here reads: it is
        given ALIGN_FRAMES, and the token probabilities, computed before and apart from that, are the
        same as with the window's frames (tests/test_asr_evidence.py checks it)."""
        features = ct2_engine().StorageView.from_array(np.ascontiguousarray(encoded))
        results = self.model.align(features, start, sequences, ALIGN_FRAMES)
        return [np.log(np.maximum(np.asarray(r.text_token_probs, np.float64), 1e-30)) for r in results]

    def word_token_ids(self, pieces: list[str]) -> list[list[int]]:
        """BPE ids of each piece as it appears after a space (how Whisper spells a word in a sentence)."""
        return [self.tokenizer.encode(" " + p, add_special_tokens=False).ids for p in pieces]

    def mark_ids(self, mark: str) -> list[int]:
        return self.tokenizer.encode(mark, add_special_tokens=False).ids

    def map_clips(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """fn(item) for each item, in order, `workers` at a time (threads: CTranslate2 releases the
        GIL and gives each its own model replica, weights shared); at most 2 x workers ahead of the
        consumer, so results can be flushed as they come."""
        if self.workers == 1:
            yield from map(fn, items)
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix=f"asr-{self.name}") as pool:
            ahead: deque = deque()
            for item in items:
                ahead.append(pool.submit(fn, item))
                if len(ahead) >= 2 * self.workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()

    # -- clips in, evidence out --
    def evidence(self, audios: list[np.ndarray], texts: list[list[str]],
                 decodes: list[ClipDecode | None] | None = None,
                 closed: list[ClosedRequest | None] | None = None,
                 prompted: list[PromptRequest | None] | None = None,
                 memories: list[np.ndarray] | None = None
                 ) -> tuple[list[ClipDecode], list[list[RowEvidence]]]:
        """Evidence for each clip and each of its expected texts; `decodes` given for a clip are reused.
        `closed[i]`: also decode clip i over that closed vocabulary from the same encoder output (into
        its ClipDecode.closed[closed[i].key]); `prompted[i]`: also teacher-force its texts after that
        prompt (into ClipDecode.prompted[prompted[i].key]). `memories[i]`: clip i's encoder output
        ([positions, d_model], e.g. an EncoderCache's, cut to the clip + a margin), read in place of
        encoding `audios[i]` (which may then be None)."""
        decodes = list(decodes) if decodes is not None else [None] * len(audios)
        closed = list(closed) if closed is not None else [None] * len(audios)
        prompted = list(prompted) if prompted is not None else [None] * len(audios)
        sizes = [self.window_s(a) for a in audios] if memories is None else [len(m) for m in memories]
        if len(set(sizes)) > 1:  # one encoder call per window size (or memory length), results back in order
            out_decodes: list[ClipDecode] = [None] * len(audios)
            out_rows: list[list[RowEvidence]] = [[] for _ in audios]
            for w in sorted(set(sizes)):
                idx = [i for i, x in enumerate(sizes) if x == w]
                d, r = self.evidence([audios[i] for i in idx], [texts[i] for i in idx], [decodes[i] for i in idx],
                                     [closed[i] for i in idx], [prompted[i] for i in idx],
                                     None if memories is None else [memories[i] for i in idx])
                for k, i in enumerate(idx):
                    out_decodes[i], out_rows[i] = d[k], r[k]
            return out_decodes, out_rows
        encoded_view = self.encode(audios) if memories is None else \
            ct2_engine().StorageView.from_array(np.ascontiguousarray(np.stack(memories), np.float32))
        encoded = np.asarray(encoded_view)
        need = [i for i, d in enumerate(decodes) if d is None]
        if need:
            sub = encoded_view if len(need) == len(audios) else \
                ct2_engine().StorageView.from_array(np.ascontiguousarray(encoded[need]))
            for i, d in zip(need, self.decode(sub)):
                decodes[i] = d
        for i, request in enumerate(prompted):
            if request is not None:
                decodes[i].prompted[request.key] = self.prompted_logprobs(encoded, i, request.prompt,
                                                                          request.sequences)
        closed_seqs: dict[tuple[int, str], list[int]] = {}   # (clip, request key) -> closed token ids
        for key in dict.fromkeys(c.key for c in closed if c is not None):
            idx = [i for i, c in enumerate(closed) if c is not None and c.key == key]
            request = closed[idx[0]]
            same = [i for i in idx if self.closed_equals_open(request, decodes[i])]
            closed_ids = {i: decodes[i].token_ids for i in same}
            idx = [i for i in idx if i not in same]
            if idx:
                sub = encoded_view if len(idx) == len(audios) else \
                    ct2_engine().StorageView.from_array(np.ascontiguousarray(encoded[idx]))
                closed_ids.update(zip(idx, self.closed_sequences(sub, request)))
            closed_seqs.update(((i, key), ids) for i, ids in closed_ids.items())
        # one teacher-forced pass: (clip, what) -> token ids, what = None (the transcript's own tokens),
        # a closed request key, or an ExpectedRendering; a closed sequence equal to the transcript is
        # aligned once (token_logprobs)
        rows, sequences, plans = [], [], []
        for i in need:                        # the transcript's own log p, once per decoded clip
            rows.append(i)
            sequences.append(decodes[i].token_ids)
            plans.append(None)
        for (i, key), ids in closed_seqs.items():
            rows.append(i)
            sequences.append(ids)
            plans.append(key)
        for i, clip_texts in enumerate(texts):
            for text in clip_texts:
                plan = ExpectedRendering.build(text, decodes[i].transcript, self)
                rows.append(i)
                sequences.append(plan.token_ids)
                plans.append(plan)
        logps = self.token_logprobs(encoded, rows, sequences)
        for i, lp, plan in zip(rows, logps, plans):
            if plan is None:
                decodes[i].stats.update(zip(("tr_mean_logp", "tr_sum_logp"), mean_and_sum(lp)))
            elif isinstance(plan, str):
                decodes[i].closed[plan] = closed_transcript(self.tokenizer.decode(closed_seqs[i, plan]).strip(), lp)
        out: list[list[RowEvidence]] = [[] for _ in audios]
        for i, lp, plan in zip(rows, logps, plans):
            if isinstance(plan, ExpectedRendering):
                out[i].append(row_evidence(plan, lp, decodes[i]))
        return decodes, out


# ---- the expected text as Whisper would write it ----------------------------------------------------

@dataclass
class ExpectedRendering:
    """The expected text in pieces (each covering one or more expected surface words) with their
    BPE ids, followed by a sentence-final mark."""
    expected: str
    words: list[str]                  # expected surface words
    pieces: list[str]                 # what is teacher-forced, in order
    piece_words: list[list[int]]      # expected word indices each piece stands for
    piece_ids: list[list[int]]
    mark_ids: list[int]

    @property
    def token_ids(self) -> list[int]:
        return [t for ids in self.piece_ids for t in ids] + self.mark_ids

    @classmethod
    def build(cls, expected: str, transcript: str, model: WhisperEvidence) -> "ExpectedRendering":
        pieces, piece_words = render_expected(expected, transcript)
        mark = transcript.rstrip()[-1:] if transcript.rstrip()[-1:] in SENTENCE_MARKS and transcript.strip() else "."
        return cls(expected, surface_words(expected), pieces, piece_words, model.word_token_ids(pieces),
                   model.mark_ids(mark))


# ---- features ------------------------------------------------------------------------------------------

def text_comparison(expected: str, transcript: str) -> dict[str, float]:
    """Exact match and word / character / phoneme edit distances of the normalised texts."""
    e = [t.text for t in normalise_tokens(expected)]
    t = [t.text for t in normalise_tokens(transcript)]
    e_chars, t_chars = " ".join(e), " ".join(t)
    e_ph = text_units(spoken_text(e), "phoneme") if e else ()
    t_ph = text_units(spoken_text(t), "phoneme") if t else ()
    word_edits, char_edits = edit_distance(e, t), edit_distance(e_chars, t_chars)
    phone_edits = edit_distance(e_ph, t_ph)
    return {"exact_match": float(e == t),
            "word_edits": float(word_edits), "word_edit_rate": word_edits / max(1, len(e)),
            "char_edits": float(char_edits), "char_edit_rate": char_edits / max(1, len(e_chars)),
            "phone_edits": float(phone_edits), "phone_edit_rate": phone_edits / max(1, len(e_ph)),
            "n_expected_words": float(len(e)), "len_diff": float(len(t) - len(e))}


def mean_and_sum(logp: np.ndarray) -> tuple[float, float]:
    """Mean and sum of a token sequence's log p (NaN, NaN for no tokens)."""
    return (float(logp.mean()), float(logp.sum())) if logp.size else (np.nan, np.nan)


def closed_transcript(text: str, logp: np.ndarray) -> ClosedTranscript:
    """A closed transcript with the mean and sum of its tokens' teacher-forced log p."""
    return ClosedTranscript(text, *mean_and_sum(logp))


def row_evidence(plan: ExpectedRendering, logp: np.ndarray, decode: ClipDecode) -> RowEvidence:
    """Features and per-word log p from the teacher-forced log p of a rendering's tokens."""
    n_text = sum(len(ids) for ids in plan.piece_ids)
    text_lp, end_lp = logp[:n_text], logp[n_text:]
    word_lp = np.zeros(len(plan.words), np.float64)
    at = 0
    for ids, covered in zip(plan.piece_ids, plan.piece_words):
        piece_lp = float(text_lp[at: at + len(ids)].sum())
        at += len(ids)
        for w in covered:                      # a piece standing for k words gives each 1/k of it
            word_lp[w] = piece_lp / len(covered)
    f = dict(text_comparison(plan.expected, decode.transcript))
    has_text = text_lp.size > 0
    f.update(exp_mean_logp=float(text_lp.mean()) if has_text else np.nan,
             exp_min_logp=float(text_lp.min()) if has_text else np.nan,
             exp_sum_logp=float(text_lp.sum()) if has_text else np.nan,
             exp_min_word_logp=float(word_lp.min()) if word_lp.size else np.nan,
             exp_low_word_frac=float(np.mean(word_lp < np.log(LOW_WORD_P))) if word_lp.size else np.nan,
             end_logp=float(end_lp.sum()) if end_lp.size else np.nan)
    f.update({k: decode.stats.get(k, np.nan) for k in CLIP_STATS})
    f["margin_mean_logp"] = f["exp_mean_logp"] - f["tr_mean_logp"]
    f["margin_sum_logp"] = f["exp_sum_logp"] - f["tr_sum_logp"]
    vector = np.array([f[name] for name in FEATURE_NAMES], np.float32)
    return RowEvidence(vector, [(w, float(lp)) for w, lp in zip(plan.words, word_lp)], decode.transcript)


# ---- the cache ------------------------------------------------------------------------------------------
# Like the alignment table's (members/gbm/alignment.py): one npz per data folder and model identity,
# merged under a lock and replaced atomically; a damaged file is recomputed, never trusted. The
# two could share one keyed-table helper; this one holds two tables (clips and rows).

def asr_device(device) -> str:
    """The CTranslate2 device for a torch device or a config's device string."""
    kind = getattr(device, "type", device) or "auto"
    return kind if kind in ("cpu", "cuda") else "auto"


def asr_cache_path(data_dir: str | Path, model: WhisperEvidence) -> Path:
    """One table per data folder, model weights, compute type, decode settings and version."""
    return cache_dir(data_dir) / f"asr_v{ASR_VERSION}_{model.identity}.npz"


def expected_texts(meta: pd.DataFrame) -> list[str]:
    """Each row's expected_text with its whitespace collapsed ("" where missing): how rows are keyed."""
    return ["" if pd.isna(t) else " ".join(str(t).split()) for t in meta["expected_text"]]


def row_key(filename: str, expected: str) -> str:
    return f"{filename}\t{' '.join(str(expected).split())}"


@dataclass
class AsrCache:
    clips: dict[str, ClipDecode] = field(default_factory=dict)
    rows: dict[str, RowEvidence] = field(default_factory=dict)


def _parse_asr_cache(z) -> AsrCache:
    names = z["feature_names"].tolist()
    if names != FEATURE_NAMES:
        raise ValueError("written with other feature names")
    clip_keys, clip_text, clip_ids, clip_stats = z["clip_keys"], z["clip_text"], z["clip_ids"], z["clip_stats"]
    row_keys, row_x, row_words = z["row_keys"], z["row_X"], z["row_words"]
    if clip_stats.shape != (len(clip_keys), len(CLIP_STATS)) or row_x.shape != (len(row_keys), len(names)):
        raise ValueError(f"tables of shape {clip_stats.shape} and {row_x.shape} for "
                         f"{len(clip_keys)} clips and {len(row_keys)} rows")
    clips = {k: ClipDecode(t, json.loads(ids), dict(zip(CLIP_STATS, map(float, s))))
             for k, t, ids, s in zip(clip_keys.tolist(), clip_text.tolist(), clip_ids.tolist(), clip_stats)}
    rows = {}
    for k, x, words in zip(row_keys.tolist(), row_x, row_words.tolist()):
        rows[k] = RowEvidence(x.astype(np.float32), [(w, float(p)) for w, p in json.loads(words)],
                              clips[k.split("\t", 1)[0]].transcript)
    return AsrCache(clips, rows)


def read_asr_cache(path: Path) -> AsrCache:
    return read_npz_cache(path, _parse_asr_cache, "ASR evidence cache") or AsrCache()


def _asr_cache_arrays(table: AsrCache) -> dict[str, np.ndarray]:
    clips, rows = table.clips, table.rows
    return dict(feature_names=np.array(FEATURE_NAMES, dtype=str),
                clip_keys=np.array(list(clips), dtype=str),
                clip_text=np.array([c.transcript for c in clips.values()], dtype=str),
                clip_ids=np.array([json.dumps(c.token_ids) for c in clips.values()], dtype=str),
                clip_stats=np.array([[c.stats.get(s, np.nan) for s in CLIP_STATS] for c in clips.values()],
                                    np.float32).reshape(len(clips), len(CLIP_STATS)),
                row_keys=np.array(list(rows), dtype=str),
                row_X=np.array([r.features for r in rows.values()], np.float32).reshape(len(rows), len(FEATURE_NAMES)),
                row_words=np.array([json.dumps(r.words) for r in rows.values()], dtype=str))


def add_to_asr_cache(path: Path, new: AsrCache) -> None:
    """Merge under a lock and replace atomically, so parallel processes never lose each other's rows."""
    def merge(table: AsrCache) -> None:
        table.clips.update(new.clips)
        table.rows.update(new.rows)
    merge_npz_cache(path, read_asr_cache, merge, _asr_cache_arrays)


# ---- a whole table ------------------------------------------------------------------------------------

def asr_table(meta: pd.DataFrame, audio_dir: str | Path, model: WhisperEvidence, cache: str | Path | None = None,
              batch_size: int | None = None, progress: bool = True, flush_every: int = 256,
              closed: dict[str, ClosedRequest] | None = None,
              on_closed: Callable[[dict[tuple[str, str], ClosedTranscript]], None] | None = None,
              prompted: dict[str, PromptRequest] | None = None,
              on_prompted: Callable[[dict[str, tuple[PromptRequest, list[np.ndarray]]]], None] | None = None,
              memory=None) -> AsrTable:
    """Evidence for every row of a metadata table (filename, expected_text), in its order.

    Rows known to `cache` (asr_cache_path) are read back; the rest are computed in batches of
    clips (`batch_size`, default the model's: 1 on CPU, 16 on CUDA; each clip decoded once, whatever
    the number of its rows; the model's `workers` batches at once) and added to the cache every
    `flush_every` clips, so an interrupted run keeps what it did. A clip that cannot be read, or a
    row without expected text, is left out of `ok` with a warning naming it.

    `closed`: {filename: ClosedRequest} of clips that also want a closed-vocabulary transcript
    (members/gbm/closed.py); those this call encodes anyway are decoded from the same encoder output
    and handed to `on_closed` as {(filename, request key): ClosedTranscript} at every flush (the closed
    cache lives in closed.py). `prompted` / `on_prompted` the same for teacher forcing after a prompt
    ({filename: (PromptRequest, log p of each of its texts)}; members/gbm/prompted.py).

    `memory`: where each clip's encoder output is read instead of encoding its audio (an object with
    `get(filename)` and `__contains__`, e.g. whisper.encoder_cache.EncoderCache, already filled); give
    such a table its own `cache` path (another encoder, other numbers).
    """
    for column in ("filename", "expected_text"):
        if column not in meta.columns:
            raise ValueError(f"metadata has no {column!r} column (columns: {', '.join(meta.columns)})")
    names = meta["filename"].astype(str).tolist()
    texts = expected_texts(meta)
    keys = [row_key(n, t) for n, t in zip(names, texts)]
    known = read_asr_cache(Path(cache)) if cache is not None else AsrCache()
    todo: dict[str, list[str]] = {}
    for row, (name, text, key) in enumerate(zip(names, texts, keys)):
        if not text:
            log.warning("row %d (%s): empty expected_text, no ASR evidence", row, name)
        elif key not in known.rows and text not in todo.setdefault(name, []):
            todo[name].append(text)
    todo = {n: t for n, t in todo.items() if t}
    found_rows = dict(known.rows)
    fresh = AsrCache()
    closed = closed or {}
    closed_fresh: dict[tuple[str, str], ClosedTranscript] = {}
    prompted = prompted or {}
    prompted_fresh: dict[str, tuple[PromptRequest, list[np.ndarray]]] = {}
    clip_names = list(todo)
    batch_size = batch_size or model.batch_size
    chunks = [clip_names[start: start + batch_size] for start in range(0, len(clip_names), batch_size)]

    def compute(chunk: list[str]) -> tuple[list[str], list[ClipDecode], list[list[RowEvidence]]]:
        batch, audios, memories = [], [], []
        for name in chunk:
            if memory is not None:
                if name in memory:
                    batch.append(name)
                    audios.append(None)
                    memories.append(memory.get(name))
                else:
                    log.warning("no ASR evidence for %s: no encoder output for it", name)
                continue
            try:
                audios.append(load_audio(Path(audio_dir) / name))
                batch.append(name)
            except AudioError as exc:
                log.warning("no ASR evidence for %s: %s", name, exc)
        if not batch:
            return [], [], []
        return (batch, *model.evidence(audios, [todo[n] for n in batch], [known.clips.get(n) for n in batch],
                                       [closed.get(n) for n in batch], [prompted.get(n) for n in batch],
                                       memories if memory is not None else None))

    bar = tqdm(total=len(clip_names), desc=f"ASR evidence ({model.name})", unit="clip",
               disable=not progress or not clip_names)
    for k, (batch, decodes, evidence) in enumerate(model.map_clips(compute, chunks)):
        for name, decode, rows in zip(batch, decodes, evidence):
            fresh.clips[name] = decode
            if name in closed:
                vocab = closed[name].key
                closed_fresh[name, vocab] = decode.closed[vocab]
            if name in prompted:
                prompted_fresh[name] = (prompted[name], decode.prompted[prompted[name].key])
            for text, ev in zip(todo[name], rows):
                fresh.rows[row_key(name, text)] = found_rows[row_key(name, text)] = ev
        bar.update(len(chunks[k]))
        last_batch = k == len(chunks) - 1
        if cache is not None and fresh.rows and (len(fresh.clips) >= flush_every or last_batch):
            add_to_asr_cache(Path(cache), fresh)
            fresh = AsrCache()
        if on_closed is not None and closed_fresh and (len(closed_fresh) >= flush_every or last_batch):
            on_closed(closed_fresh)
            closed_fresh = {}
        if on_prompted is not None and prompted_fresh and (len(prompted_fresh) >= flush_every or last_batch):
            on_prompted(prompted_fresh)
            prompted_fresh = {}
    bar.close()
    X = np.full((len(meta), len(FEATURE_NAMES)), np.nan, np.float32)
    ok = np.zeros(len(meta), bool)
    transcripts, words = [""] * len(meta), [[] for _ in range(len(meta))]
    for row, key in enumerate(keys):
        ev = found_rows.get(key)
        if ev is not None:
            X[row], ok[row], transcripts[row], words[row] = ev.features, True, ev.transcript, ev.words
    return AsrTable(X, ok, transcripts, words)


def clip_evidence(model: WhisperEvidence, audio: np.ndarray,
                  expected: str) -> tuple[list[str], np.ndarray, RowEvidence]:
    """(FEATURE_NAMES, float32 feature vector, the full evidence) of one clip and expected text."""
    _, evidence = model.evidence([np.asarray(audio, np.float32)], [[" ".join(str(expected).split())]])
    return list(FEATURE_NAMES), evidence[0][0].features, evidence[0][0]
