"""The expected text's log p when Whisper is told the task's words first.

Whisper's decoder is a language model as much as an ear: on a voice it cannot place, what it
expects English to say outweighs what it hears, and the expected text of a right answer comes out
nearly as unlikely as a wrong one. Whisper reads "previous text" before a transcript
(<|startofprev|> ... <|startoftranscript|>), and the usual way to tell it a domain's words is to
put them there. Here that text is the task's whole vocabulary (the words of its expected texts,
alphabetical, the same prompt for every clip of the task: it says which words may come, not which
one should), and the expected text is teacher-forced after it, on the same encoder output, in the
prompt's own style: lower case words after a space, no mark. Written as the open transcript writes
it instead ("Eight seven three." or "8, 7, 3."; asr.ExpectedRendering), it loses most of the gain.
On the speaker Whisper mishears the prompt separates right answers from wrong ones far better
(docs/members.md, "A prompt of the task's words").

A vocabulary too long for a prompt (sentences: the children's set has 813 words, 935 tokens;
Whisper reads at most 223 tokens of previous text) gets no prompt: those rows' features are NaN
and cost nothing. Like the closed vocabulary (closed.py), the words are the training
table's per task, and at inference a row reads its task's training words plus its own
(closed.row_vocabularies): no other test row has a say. Features per row
(`PROMPT_FEATURES`): mean, least and summed log p of the expected text's tokens, and the mean's
gain over the unprompted one (asr's exp_mean_logp). Cached per (clip, expected text, vocabulary)
in <data>/cache/prompted_v2_<model>.npz. A clip whose other ASR evidence is computed in the same run
is scored from that pass's encoder output (asr_table(prompted=...)): one align call per clip for all
its rows of a task, no encoder pass of its own; clips cached before get one here.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ...audio import AudioError, load_audio
from ...features import BatchedCacheWrites, merge_npz_cache, read_npz_cache
from ...layout import cache_dir
from .evidence import FEATURE_NAMES, AsrTable, PromptRequest, WhisperEvidence, expected_texts, row_key
from .closed import row_vocabularies, written_words

log = logging.getLogger("readaloud")
PROMPT_VERSION = 2   # 2: the expected text in the prompt's style
PROMPT_MAX_TOKENS = 160   # of previous text (Whisper allows 223; the expected text needs the rest of 448)
PROMPT_FEATURES: dict[str, str] = {
    "prompt_mean_logp": "mean log p of the expected text's tokens after a prompt of the task's words",
    "prompt_min_logp": "log p of its least likely token after the prompt",
    "prompt_sum_logp": "sum of its tokens' log p after the prompt",
    "prompt_gain_mean_logp": "prompt_mean_logp - exp_mean_logp: how much the task's words help",
}
PROMPT_FEATURE_NAMES = list(PROMPT_FEATURES)
TABLE_COLUMNS = PROMPT_FEATURE_NAMES[:3]   # prompted_table's X: the gain needs the ASR table


def prompt_words(words: list[str]) -> list[str]:
    """The words a prompt lists: as written (the vocabulary also holds normalised forms, "9" beside
    "nine": a prompt in words asks for words), alphabetical, each once."""
    return sorted({w for w in words if not any(c.isdigit() for c in w)})


def prompt_ids(model: WhisperEvidence, words: list[str]) -> list[int] | None:
    """<|startofprev|> and the BPE ids of the task's words, or None when they do not fit."""
    listed = prompt_words(words)
    ids = model.tokenizer.encode(" " + " ".join(listed), add_special_tokens=False).ids if listed else []
    if not ids or len(ids) > PROMPT_MAX_TOKENS:
        return None
    start = model.tokenizer.token_to_id("<|startofprev|>")
    if start is None:
        raise ValueError(f"{model.model_dir}/tokenizer.json has no <|startofprev|> token: not a Whisper tokenizer")
    return [start, *ids]


def tasks_that_fit(model: WhisperEvidence, words: dict[str, list[str]]) -> list[str]:
    """The tasks whose words fit in one prompt (prompt_ids): the small closed vocabularies (digits,
    word lists), not the open-ended words of a sentence task."""
    return sorted(task for task, w in words.items() if prompt_ids(model, w) is not None)


def vocabulary_key(words: list[str]) -> str:
    return hashlib.sha1(json.dumps(prompt_words(words)).encode()).hexdigest()[:10]


def _key(filename: str, expected: str, vocab_key: str) -> str:
    return f"{row_key(filename, expected)}\t{vocab_key}"


@dataclass
class PromptedCache:
    values: dict[str, np.ndarray] = field(default_factory=dict)   # key -> [mean, min, sum]


def _parse(z) -> PromptedCache:
    keys, values = z["keys"].tolist(), z["values"]
    if values.shape != (len(keys), len(TABLE_COLUMNS)):
        raise ValueError(f"{len(keys)} keys for values of shape {values.shape}")
    return PromptedCache(dict(zip(keys, values.astype(np.float64))))


def read_prompted_cache(path: Path) -> PromptedCache:
    return read_npz_cache(path, _parse, "prompted log p cache") or PromptedCache()


def _cache_arrays(table: PromptedCache) -> dict[str, np.ndarray]:
    return dict(keys=np.array(list(table.values), dtype=str),
                values=np.array(list(table.values.values()), np.float64).reshape(len(table.values),
                                                                                 len(TABLE_COLUMNS)))


def add_to_prompted_cache(path: Path, new: dict[str, np.ndarray]) -> None:
    merge_npz_cache(path, read_prompted_cache, lambda table: table.values.update(new), _cache_arrays)


def prompted_cache_path(data_dir: str | Path, model: WhisperEvidence) -> Path:
    return cache_dir(data_dir) / f"prompted_v{PROMPT_VERSION}_{model.identity}.npz"


def prompted_text_ids(model: WhisperEvidence, expected: str) -> list[int]:
    """The expected text as the prompt writes words: lower case, each after a space, no marks."""
    words = written_words(expected)
    return model.tokenizer.encode(" " + " ".join(words), add_special_tokens=False).ids if words else []


def logp_stats(logp: np.ndarray) -> np.ndarray:
    """[mean, min, sum] of a token sequence's log p, NaN if it has none."""
    if not logp.size:
        return np.full(len(TABLE_COLUMNS), np.nan)
    return np.array([logp.mean(), logp.min(), logp.sum()], np.float64)


def prompted_logprobs(model: WhisperEvidence, audio: np.ndarray, prompt: list[int] | tuple[int, ...],
                      sequences: list[list[int]] | tuple[tuple[int, ...], ...]) -> list[np.ndarray]:
    """Teacher-forced log p of each token sequence after `prompt`, on the clip's own encoder pass
    (for clips whose other ASR evidence was cached before)."""
    return model.prompted_logprobs(np.asarray(model.encode([audio])), 0, prompt, sequences)


def row_prompts(meta: pd.DataFrame, model: WhisperEvidence, words: dict[str, list[str]], per_clip: bool = False
                ) -> list[tuple[tuple[int, ...], str] | None]:
    """Each row's (prompt ids, vocabulary key): its vocabulary (closed.row_vocabularies: its task's
    words in `words` and its own) when it fits in a prompt; else, with `per_clip`, the row's own
    expected words (a sentence's words, alphabetical: which words may come, for tasks whose vocabulary
    is too long); else None. No other row has a say in a row's prompt."""
    for column in ("filename", "task", "expected_text"):
        if column not in meta.columns:
            raise ValueError(f"metadata has no {column!r} column (columns: {', '.join(meta.columns)})")
    out: list[tuple[tuple[int, ...], str] | None] = []
    prompts: dict[str, tuple[tuple[int, ...], str] | None] = {}
    own: dict[str, tuple[tuple[int, ...], str] | None] = {}
    for text, vocabulary in zip(expected_texts(meta), row_vocabularies(meta, words)):
        key = vocabulary_key(vocabulary)
        if key not in prompts:
            ids = prompt_ids(model, vocabulary)
            prompts[key] = (tuple(ids), key) if ids is not None else None
        if prompts[key] is not None:
            out.append(prompts[key])
        elif per_clip and text:
            if text not in own:
                clip_words = written_words(text)
                clip_ids = prompt_ids(model, clip_words)
                own[text] = (tuple(clip_ids), "own_" + vocabulary_key(clip_words)) if clip_ids else None
            out.append(own[text])
        else:
            out.append(None)
    return out


def clip_requests(meta: pd.DataFrame, model: WhisperEvidence, words: dict[str, list[str]],
                  known: dict[str, np.ndarray] | None = None, per_clip: bool = False,
                  prompts: list[tuple[tuple[int, ...], str] | None] | None = None
                  ) -> dict[tuple[str, str], PromptRequest]:
    """{(filename, vocabulary key): its PromptRequest} of every clip with a row that has a prompt
    (`prompts`, the rows' row_prompts, derived here when not given), holding the clip's texts under
    that prompt that `known` (cache keys) lacks; clips with nothing left are left out."""
    prompts = prompts if prompts is not None else row_prompts(meta, model, words, per_clip)
    known = known or {}
    texts: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}   # (clip, vocabulary key) -> {text: its ids}
    ids_of: dict[str, tuple[int, ...]] = {}
    for name, text, prompt in zip(meta["filename"].astype(str), expected_texts(meta), prompts):
        if not text or prompt is None or _key(name, text, prompt[1]) in known \
                or text in texts.get((name, prompt[1]), {}):
            continue
        ids = tuple(prompted_text_ids(model, text))
        if ids:
            texts.setdefault((name, prompt[1]), {})[text] = ids
            ids_of[prompt[1]] = prompt[0]
    return {(name, key): PromptRequest(key, ids_of[key], tuple(clip_texts), tuple(clip_texts.values()))
            for (name, key), clip_texts in texts.items()}


def cache_entries(name: str, request: PromptRequest, logps: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The prompted cache's rows of one clip's request and the log p of its texts."""
    return {_key(name, text, request.key): logp_stats(lp) for text, lp in zip(request.texts, logps)}


def cache_writer(path: Path) -> Callable[[dict[str, tuple[PromptRequest, list[np.ndarray]]]], None]:
    """What asr_table(on_prompted=...) calls with {filename: (request, log p of its texts)}: adds
    them to the cache at `path`."""
    def write(scored: dict[str, tuple[PromptRequest, list[np.ndarray]]]) -> None:
        entries: dict[str, np.ndarray] = {}
        for name, (request, logps) in scored.items():
            entries.update(cache_entries(name, request, logps))
        add_to_prompted_cache(path, entries)
    return write


def pending_requests(meta: pd.DataFrame, model: WhisperEvidence, words: dict[str, list[str]],
                     cache: str | Path | None, per_clip: bool = False) -> dict[str, PromptRequest]:
    """{filename: PromptRequest} of the clips whose prompted log p `cache` lacks: what
    asr_table(prompted=...) scores from the encoder output it computes anyway (a clip's first task)."""
    known = read_prompted_cache(Path(cache)).values if cache is not None else {}
    out: dict[str, PromptRequest] = {}
    for (name, _), request in clip_requests(meta, model, words, known, per_clip).items():
        out.setdefault(name, request)
    return out


def prompted_table(meta: pd.DataFrame, audio_dir: str | Path, model: WhisperEvidence, words: dict[str, list[str]],
                   cache: str | Path | None = None, progress: bool = True, flush_every: int = 256,
                   per_clip: bool = False) -> AsrTable:
    """TABLE_COLUMNS of every row of `meta` (filename, task, expected_text) that has a prompt
    (row_prompts: its task's words in `words` and its own, when they fit; else, with `per_clip`, its own expected words). Other rows, and those of unreadable
    clips, are NaN and not ok; computed rows are added to `cache` every `flush_every` clips."""
    known = read_prompted_cache(Path(cache)) if cache is not None else PromptedCache()
    found = dict(known.values)
    prompts = row_prompts(meta, model, words, per_clip)
    requests = clip_requests(meta, model, words, found, per_clip, prompts)

    def score(item: tuple[str, str]) -> dict[str, np.ndarray] | None:
        name, request = item[0], requests[item]
        try:
            audio = load_audio(Path(audio_dir) / name)
        except AudioError as exc:
            log.warning("no prompted log p for %s: %s", name, exc)
            return None
        return cache_entries(name, request, prompted_logprobs(model, audio, request.prompt, request.sequences))

    items = list(requests)
    writes = BatchedCacheWrites(add_to_prompted_cache, None if cache is None else Path(cache), flush_every)
    for values in tqdm(model.map_clips(score, items), total=len(items), desc=f"prompted log p ({model.name})",
                       unit="clip", disable=not progress or not items):
        if values is None:
            continue
        found.update(values)
        writes.update(values)
    writes.close()
    X = np.full((len(meta), len(TABLE_COLUMNS)), np.nan, np.float32)
    ok = np.zeros(len(meta), bool)
    names, texts = meta["filename"].astype(str).tolist(), expected_texts(meta)
    for row, (name, text, prompt) in enumerate(zip(names, texts, prompts)):
        values = found.get(_key(name, text, prompt[1])) if text and prompt is not None else None
        if values is not None:
            X[row], ok[row] = values, True
    return AsrTable(X, ok, [""] * len(meta), [[] for _ in range(len(meta))])


def prompted_block(open_table: AsrTable, prompted: AsrTable) -> np.ndarray:
    """[rows, len(PROMPT_FEATURE_NAMES)] from one backbone's ASR evidence and prompted table (same
    rows): the prompted log p and its gain over the unprompted mean. NaN where no prompt."""
    X = prompted.X.astype(np.float64)
    gain = X[:, 0] - open_table.X[:, FEATURE_NAMES.index("exp_mean_logp")].astype(np.float64)
    return np.column_stack([X, gain])
