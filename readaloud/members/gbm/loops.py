"""Greedy decoding loops: what a transcript says before Whisper starts repeating itself.

On a short clip it cannot place, Whisper's greedy decode often falls into a loop and repeats a
word or a phrase until its length limit: "8, 10, 3, 8, 10, 3, 8, 10, 8, 8, 8, ..." for "eight
seven three", "I do not know where I do not know where I do not k" for "i do not know where", and
many looped transcripts are right answers; the closed-vocabulary decodes (closed.py) loop a little
more often (how often: docs/members.md, "Greedy decoding loops").
The edit distances of evidence.py count every repeated word, so a looped transcript of a right answer
looks as wrong as silence. These features read the transcript the way a person would:

- `loop_share`: the share of the transcript's normalised words that only repeat an earlier cycle
  at its end (`loop_length`), 0 when it does not loop;
- `prefix_word_edit_rate`, `prefix_char_edit_rate`: the fewest word (character) edits between the
  expected text and any start of the transcript, per expected word (character): what Whisper
  wrote after the answer, a loop or anything else, costs nothing. The trees see both these and the
  whole-transcript distances, so an answer with a word added at its end still differs from a loop.

They depend on the transcripts' text only, so they are computed from the cached transcripts when
the feature table is built, not stored in any cache (`LOOP_FEATURES`; model.asr_loop_features,
model6asr's default).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ...normalise import normalise_tokens, prefix_edit_distances

LOOP_FEATURES: dict[str, str] = {
    "loop_share": "share of the transcript's words that repeat an earlier cycle at its end (a greedy "
                  "decoding loop), 0 without one",
    "prefix_word_edit_rate": "fewest word edits between the expected text and any start of the transcript, "
                             "per expected word",
    "prefix_char_edit_rate": "fewest character edits between the expected text and any start of the transcript, "
                             "per expected character",
}
LOOP_FEATURE_NAMES = list(LOOP_FEATURES)
MIN_CYCLES = 3        # a cycle must appear this many times in a row at the end ...
MIN_LOOP_WORDS = 4    # ... and its repeats hold at least this many words ("7, 7, 7" for "seven seven
                      # seven" is an answer, "0 0 0 0 0 ..." a loop)
MAX_PERIOD = 12       # longest cycle looked for, in words (a repeated sentence of a sentence task)


def loop_length(words: list[str]) -> int:
    """How many of `words` at the end only repeat the cycle before them: the longest run of repeats
    of a cycle of 1..MAX_PERIOD words that ends the list, holds at least MIN_CYCLES cycles and
    MIN_LOOP_WORDS repeated words (its first cycle is not counted); 0 if there is none. A decode
    cut by its length limit may end in part of a word, so the list without its last word is tried
    too."""
    best = 0
    for ending in (words, words[:-1]):
        n = len(ending)
        for period in range(1, min(MAX_PERIOD, n // MIN_CYCLES) + 1):
            start = n - period
            while start > 0 and ending[start - 1] == ending[start - 1 + period]:
                start -= 1
            repeated = n - start - period
            if n - start >= MIN_CYCLES * period and repeated >= MIN_LOOP_WORDS:
                best = max(best, repeated)
    return best


@lru_cache(maxsize=1 << 16)
def loop_features(expected: str, transcript: str) -> tuple[float, ...]:
    """LOOP_FEATURE_NAMES of one transcript against one expected text (normalised tokens, as
    asr.text_comparison compares them). Cached: folds and ear copies ask for the same pairs."""
    e = [t.text for t in normalise_tokens(expected)]
    t = [t.text for t in normalise_tokens(transcript)]
    words = prefix_edit_distances(e, t).min()
    e_chars = " ".join(e)
    chars = prefix_edit_distances(e_chars, " ".join(t)).min()
    return (loop_length(t) / len(t) if t else 0.0,
            float(words) / max(1, len(e)), float(chars) / max(1, len(e_chars)))


def loop_block(texts: list[str], transcripts: list[str], ok: np.ndarray) -> np.ndarray:
    """float64 [rows, len(LOOP_FEATURE_NAMES)] for rows of expected texts and their transcripts
    (one backbone's open or closed table); NaN where the row has no evidence (`ok` False)."""
    out = np.full((len(texts), len(LOOP_FEATURE_NAMES)), np.nan)
    for row, (text, transcript) in enumerate(zip(texts, transcripts)):
        if ok[row] and text:
            out[row] = loop_features(text, transcript)
    return out
