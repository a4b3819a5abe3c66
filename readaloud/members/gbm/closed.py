"""Closed-vocabulary transcripts: what Whisper hears when it may only write the screener's words.

An open greedy decode lets Whisper's language model pick any English: a voice it cannot place
comes back as the likeliest English it resembles (FSDD's nicolas: "three eight" -> "Please,",
"nine" -> "Nice"), and the transcript proves nothing either way. A screener's items come from a
small vocabulary, though, so a second greedy decode of the same encoder output may write only
the words of the task's expected texts (their BPE tokens after a space or not, lower case or
capitalised), ',' and '.', and end of text; every other token is suppressed. Among the words the
child could have meant, which one does the audio favour? On voices Whisper cannot place, a correct
clip's closed transcript matches the expected text far more often than its open one, and an
incorrect item's does not (a substituted, dropped or added word is still a word of the vocabulary;
measured: docs/members.md, "Closed-vocabulary transcripts").

The vocabulary is per task: the normalised words of the task's expected texts in the training
table (the same for every fold, so computed once). At inference a row reads its task's training
words plus its own expected text's words (row_vocabularies; a task never trained on reads every
task's training words plus its own): never the other test rows', so a row's score depends on that
row alone, and a single test clip never gets a vocabulary of its own words only, in which any
answer would come back as the expected one. A transcript and its tokens' log p are cached per (clip,
vocabulary, limit) in <data>/cache/closed_v3_<model>.npz; a clip whose other ASR evidence is computed in the same run is
decoded from that pass's encoder output (asr_table(closed=...)), so the closed decode costs a
decode, not another encoder pass. Features per row (`CLOSED_FEATURES`): exact match, word and
phoneme edit rates of the closed transcript against the expected text, and (`CLOSED_LOGP_FEATURES`,
model.asr_closed_logp, model6asr's default) how sure Whisper is of the closed transcript: the teacher-forced log p
of its tokens and the expected text's margin over it. A voice Whisper cannot place gets a closed
transcript it is unsure of, so a mismatch there proves less than one it writes with confidence, and
an expected text nearly as likely as the closed transcript is nearly as good an account of the audio.

A restricted vocabulary traps Whisper in loops: with no way to say what it hears, it repeats
words up to the length limit ("8, 1, 3, 2, 5, 8, 1, 3, 2, 5, ..." for "eight one three two"; how
often: docs/members.md, "The closed decode's length limit"). Such a transcript is long past any match,
so a closed decode stops at 4x
its clip's expected text in tokens + 8 (`closed_max_length`): a cut loop still has at least twice
the expected words, so its exact match is 0 and its edit rates above 1 as before; only how far
above 1 changes. The limit is part of the cache key (`ClosedRequest.key`).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ...audio import AudioError, load_audio
from ...features import BatchedCacheWrites, merge_npz_cache, read_npz_cache
from ...layout import cache_dir
from .evidence import (FEATURE_NAMES, AsrTable, ClosedRequest, ClosedTranscript, WhisperEvidence, expected_texts,
                  text_comparison)
from ...normalise import normalise_tokens, surface_words

log = logging.getLogger("readaloud")
CLOSED_VERSION = 3   # 2: closed decodes stop at closed_max_length; 3: with their tokens' log p
CLOSED_FEATURES: dict[str, str] = {
    "closed_exact_match": "1 if the closed-vocabulary transcript equals the normalised expected text",
    "closed_word_edit_rate": "word edit distance of the closed transcript / expected words",
    "closed_phone_edit_rate": "espeak-phoneme edit distance of the closed transcript / expected phonemes",
}
CLOSED_FEATURE_NAMES = list(CLOSED_FEATURES)
CLOSED_LOGP_FEATURES: dict[str, str] = {
    "closed_mean_logp": "teacher-forced mean log p of the closed transcript's tokens (NaN: empty transcript)",
    "closed_sum_logp": "sum of the closed transcript tokens' log p",
    "closed_margin_mean_logp": "exp_mean_logp - closed_mean_logp: how much less likely the expected text is "
                               "than the task words Whisper heard",
    "closed_margin_sum_logp": "exp_sum_logp - closed_sum_logp",
}
CLOSED_LOGP_NAMES = list(CLOSED_LOGP_FEATURES)
TABLE_COLUMNS = CLOSED_FEATURE_NAMES + CLOSED_LOGP_NAMES[:2]   # closed_table's X: the margins need the ASR table
MARKS = (",", ".")
LOOP_TOKENS = (4, 8)   # a closed decode writes at most 4 x its expected text's tokens + 8
_EDGE_PUNCTUATION = "\"'.,;:!?()[]{}-"


def written_words(text: str) -> list[str]:
    """The words of a text as written: lower case, edge punctuation stripped ("Nine," -> "nine")."""
    return [w for w in (w.strip(_EDGE_PUNCTUATION).lower() for w in surface_words(text)) if w]


def task_words(meta: pd.DataFrame) -> dict[str, list[str]]:
    """{task: sorted words of its expected texts} of a metadata table: each word as written (lower
    case, edge punctuation stripped: "nine") and normalised ("9"), since Whisper writes either."""
    out: dict[str, set[str]] = {}
    for task, text in zip(meta["task"].astype(str), meta["expected_text"]):
        if isinstance(text, str) and text.strip():
            words = out.setdefault(task, set())
            words.update(written_words(text))
            words.update(t.text for t in normalise_tokens(text))
            words.discard("")
    return {task: sorted(words) for task, words in sorted(out.items())}


def merge_words(*vocabularies: dict[str, list[str]]) -> dict[str, list[str]]:
    """The union, task by task."""
    out: dict[str, set[str]] = {}
    for vocab in vocabularies:
        for task, words in vocab.items():
            out.setdefault(task, set()).update(words)
    return {task: sorted(words) for task, words in sorted(out.items())}


def vocabulary_key(words: list[str]) -> str:
    return hashlib.sha1(json.dumps(sorted(words)).encode()).hexdigest()[:10]


def allowed_tokens(model: WhisperEvidence, words: list[str]) -> list[int]:
    """Token ids a closed decode may write: each word's BPE ids as Whisper spells it after a space
    and at the start, lower case and capitalised; the marks; end of text."""
    ids: set[int] = {model.eot}
    for word in words:
        for form in {word, word.capitalize()}:
            ids.update(model.tokenizer.encode(" " + form, add_special_tokens=False).ids)
            ids.update(model.tokenizer.encode(form, add_special_tokens=False).ids)
    for mark in MARKS:
        ids.update(model.mark_ids(mark))
    return sorted(ids)


def suppressed_tokens(model: WhisperEvidence, allowed: list[int]) -> list[int]:
    """Every id of the vocabulary but `allowed` (special tokens above end of text included)."""
    keep = np.zeros(model.tokenizer.get_vocab_size(), bool)
    keep[allowed] = True
    return np.flatnonzero(~keep).tolist()


def closed_cache_path(data_dir: str | Path, model: WhisperEvidence) -> Path:
    return cache_dir(data_dir) / f"closed_v{CLOSED_VERSION}_{model.identity}.npz"


def _key(filename: str, vocab_key: str) -> str:
    return f"{filename}\t{vocab_key}"


@dataclass
class ClosedCache:
    transcripts: dict[str, ClosedTranscript] = field(default_factory=dict)


def _parse(z) -> ClosedCache:
    keys, texts, logp = z["keys"].tolist(), z["transcripts"].tolist(), z["logp"]
    if len(keys) != len(texts) or logp.shape != (len(keys), 2):
        raise ValueError(f"{len(keys)} keys for {len(texts)} transcripts and log p of shape {logp.shape}")
    return ClosedCache({k: ClosedTranscript(t, float(m), float(s)) for k, t, (m, s) in zip(keys, texts, logp)})


def read_closed_cache(path: Path) -> ClosedCache:
    return read_npz_cache(path, _parse, "closed-vocabulary cache") or ClosedCache()


def _cache_arrays(table: ClosedCache) -> dict[str, np.ndarray]:
    values = list(table.transcripts.values())
    return dict(keys=np.array(list(table.transcripts), dtype=str),
                transcripts=np.array([c.text for c in values], dtype=str),
                logp=np.array([[c.mean_logp, c.sum_logp] for c in values], np.float64).reshape(len(values), 2))


def add_to_closed_cache(path: Path, new: dict[tuple[str, str], ClosedTranscript]) -> None:
    """Merge {(filename, request key): ClosedTranscript} into the cache file (under its lock, atomically)."""
    new = {_key(name, vocab): transcript for (name, vocab), transcript in new.items()}
    merge_npz_cache(path, read_closed_cache, lambda table: table.transcripts.update(new), _cache_arrays)


def closed_decode(model: WhisperEvidence, audio: np.ndarray, request: ClosedRequest) -> ClosedTranscript:
    """The closed transcript of one clip and its tokens' log p (its own encoder pass: for clips whose
    other ASR evidence was cached before)."""
    encoded = model.encode([audio])
    ids = model.closed_sequences(encoded, request)
    return model.closed_transcripts(np.asarray(encoded), [0], ids)[0]


def closed_max_length(model: WhisperEvidence, texts: list[str]) -> int:
    """CTranslate2's max_length for a closed decode of a clip expected to say `texts`: room for
    LOOP_TOKENS of the longest text's BPE tokens (ctranslate2 4.x writes max_length // 2 tokens,
    hence twice that), never more than the open decode's limit."""
    factor, margin = LOOP_TOKENS
    longest = max(len(model.tokenizer.encode(" " + t, add_special_tokens=False).ids) for t in texts)
    return min(model.settings.max_length, 2 * (factor * longest + margin))


def own_words(text) -> set[str]:
    """The words of one expected text as the vocabulary holds them: as written and normalised."""
    if not isinstance(text, str) or not text.strip():
        return set()
    return (set(written_words(text)) | {t.text for t in normalise_tokens(text)}) - {""}


def _known_words(words: dict[str, list[str]]) -> tuple[dict[str, set[str]], set[str]]:
    """({task: its words}, every task's words) of a training vocabulary: what a row's own words are
    checked against (its task's, or every task's for a task the vocabulary lacks)."""
    return {task: set(w) for task, w in words.items()}, set().union(*words.values()) if words else set()


def row_vocabularies(meta: pd.DataFrame, words: dict[str, list[str]]) -> list[list[str]]:
    """Each row's vocabulary: its task's words in `words` (the training table's) and the words of its
    own expected text; a task `words` lacks reads every task's words in `words`. No other row has a
    say, so adding, removing or breaking a test row changes no other row's vocabulary. During
    training `words` holds every row's own words already, so each row reads its task's words."""
    known, every = _known_words(words)
    out: list[list[str]] = []
    made: dict[tuple[str, str], list[str]] = {}
    for task, text in zip(meta["task"].astype(str), meta["expected_text"]):
        text = text if isinstance(text, str) else ""
        if (task, text) not in made:
            base = words.get(task, sorted(every))
            own = own_words(text)
            made[task, text] = base if own <= known.get(task, every) else sorted(set(base) | own)
        out.append(made[task, text])
    return out


def new_word_rows(meta: pd.DataFrame, words: dict[str, list[str]]) -> np.ndarray:
    """Per row of `meta`: does its expected text hold a word its task's training words (`words`; a task
    they lack: every task's) do not? Such a row's vocabulary and task-word prompt offer the words it
    was trained with plus its own, never the other words a child might say in their place (those
    are not known without the other test rows), so a closed transcript matching it proves less than
    on the training rows, whose vocabulary held every alternative their task's texts had. Reads the
    row alone."""
    known, every = _known_words(words)
    return np.array([not own_words(text) <= known.get(task, every)
                     for task, text in zip(meta["task"].astype(str), meta["expected_text"])], bool)


def clip_requests(meta: pd.DataFrame, model: WhisperEvidence, words: dict[str, list[str]]
                  ) -> dict[tuple[str, str, str], ClosedRequest]:
    """{(filename, task, expected text): its ClosedRequest} of every row with an expected text: the
    row's vocabulary (row_vocabularies) and a length limit from its own text."""
    requests: dict[tuple[str, str, str], ClosedRequest] = {}
    suppress: dict[str, list[int]] = {}
    limits: dict[str, int] = {}
    for name, task, text, vocabulary in zip(meta["filename"].astype(str), meta["task"].astype(str),
                                            expected_texts(meta), row_vocabularies(meta, words)):
        if not text or (name, task, text) in requests:
            continue
        key = vocabulary_key(vocabulary)
        if key not in suppress:
            suppress[key] = suppressed_tokens(model, allowed_tokens(model, vocabulary))
        if text not in limits:
            limits[text] = closed_max_length(model, [text])
        requests[name, task, text] = ClosedRequest(key, suppress[key], limits[text])
    return requests


def pending_requests(meta: pd.DataFrame, model: WhisperEvidence, words: dict[str, list[str]],
                     cache: str | Path | None) -> dict[str, ClosedRequest]:
    """{filename: ClosedRequest} of the clips whose closed transcript `cache` lacks: what
    asr_table(closed=...) decodes from the encoder output it computes anyway (a clip's first request)."""
    known = read_closed_cache(Path(cache)).transcripts if cache is not None else {}
    out: dict[str, ClosedRequest] = {}
    for (name, _, _), request in clip_requests(meta, model, words).items():
        if name not in out and _key(name, request.key) not in known:
            out[name] = request
    return out


def closed_table(meta: pd.DataFrame, audio_dir: str | Path, model: WhisperEvidence,
                 words: dict[str, list[str]], cache: str | Path | None = None, progress: bool = True,
                 flush_every: int = 256) -> AsrTable:
    """TABLE_COLUMNS (CLOSED_FEATURES, then the closed transcript's mean and sum log p) of every row
    of `meta` (filename, task, expected_text), each clip decoded once per vocabulary and length limit
    of its rows (clip_requests: the task's words in `words` and the row's own); computed transcripts
    are added to `cache` every `flush_every` clips."""
    for column in ("filename", "task", "expected_text"):
        if column not in meta.columns:
            raise ValueError(f"metadata has no {column!r} column (columns: {', '.join(meta.columns)})")
    requests = clip_requests(meta, model, words)
    names = meta["filename"].astype(str).tolist()
    tasks = meta["task"].astype(str).tolist()
    texts = expected_texts(meta)
    known = read_closed_cache(Path(cache)) if cache is not None else ClosedCache()
    found = dict(known.transcripts)
    todo = list({(item[0], request.key): item for item, request in requests.items()
                 if _key(item[0], request.key) not in found}.values())   # one decode per (clip, request)

    def decode(item: tuple[str, str, str]) -> ClosedTranscript | None:
        name = item[0]
        try:
            audio = load_audio(Path(audio_dir) / name)
        except AudioError as exc:
            log.warning("no closed-vocabulary transcript for %s: %s", name, exc)
            return None
        return closed_decode(model, audio, requests[item])

    writes = BatchedCacheWrites(add_to_closed_cache, None if cache is None else Path(cache), flush_every)
    for item, transcript in tqdm(zip(todo, model.map_clips(decode, todo)), total=len(todo),
                                 desc=f"closed-vocabulary decode ({model.name})", unit="clip",
                                 disable=not progress or not todo):
        if transcript is None:
            continue
        name, key = item[0], requests[item].key
        found[_key(name, key)] = transcript
        writes.update({(name, key): transcript})
    writes.close()
    X = np.full((len(meta), len(TABLE_COLUMNS)), np.nan, np.float32)
    ok = np.zeros(len(meta), bool)
    transcripts = [""] * len(meta)
    for row, (name, task, text) in enumerate(zip(names, tasks, texts)):
        transcript = found.get(_key(name, requests[name, task, text].key)) if text else None
        if transcript is None:
            continue
        c = text_comparison(text, transcript.text)
        X[row] = [c["exact_match"], c["word_edit_rate"], c["phone_edit_rate"], transcript.mean_logp,
                  transcript.sum_logp]
        ok[row], transcripts[row] = True, transcript.text
    return AsrTable(X, ok, transcripts, [[] for _ in range(len(meta))])


def closed_logp_block(open_table: AsrTable, closed: AsrTable) -> np.ndarray:
    """[rows, len(CLOSED_LOGP_NAMES)] from one backbone's ASR evidence and closed table (same rows):
    the closed transcript's log p and the expected text's margin over it."""
    exp_mean, exp_sum = (open_table.X[:, FEATURE_NAMES.index(n)].astype(np.float64)
                         for n in ("exp_mean_logp", "exp_sum_logp"))
    mean, total = (closed.X[:, TABLE_COLUMNS.index(n)].astype(np.float64)
                   for n in ("closed_mean_logp", "closed_sum_logp"))
    return np.column_stack([mean, total, exp_mean - mean, exp_sum - total])
