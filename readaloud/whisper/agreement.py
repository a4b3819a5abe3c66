"""Agreement between transcripts of one clip: do two Whispers, or one Whisper's open and closed
decodes, write the same words?

Where a voice is easy, tiny.en and base write the same transcript and the closed decode equals the
open one; where Whisper cannot place a voice, each guesses differently ("to take the..." and "Two,
three, two, three." for one of nicolas's "two two six three"). How far the guesses are apart says how
much any one of them proves, whatever the expected text. Features per row (`AGREEMENT_FEATURES`,
model.asr_agreement), word edit distances of normalised tokens (asr.text_comparison's) per expected
word, from the cached transcripts only:

- `open_disagreement`: between the first two backbones' open transcripts;
- `closed_disagreement`: between their closed transcripts (with the closed vocabulary);
- `open_closed_disagreement` per backbone: between its open and its closed transcript.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .normalise import edit_distance, normalise_tokens

AGREEMENT_FEATURES: dict[str, str] = {
    "open_disagreement": "word edits between the first two backbones' open transcripts, per expected word",
    "closed_disagreement": "word edits between the first two backbones' closed transcripts, per expected word",
    "open_closed_disagreement": "word edits between a backbone's open and closed transcripts, per expected word",
}


@lru_cache(maxsize=1 << 16)
def _tokens(text: str) -> tuple[str, ...]:
    return tuple(t.text for t in normalise_tokens(text))


def disagreement(expected: str, a: str, b: str) -> float:
    """Word edit distance between transcripts `a` and `b` per normalised expected word."""
    return edit_distance(_tokens(a), _tokens(b)) / max(1, len(_tokens(expected)))


def agreement_names(labels: list[str], closed: bool) -> list[str]:
    """Column names of `agreement_block` for backbones labelled `labels` (at least one)."""
    names = ["open_disagreement"] if len(labels) > 1 else []
    if closed:
        names += (["closed_disagreement"] if len(labels) > 1 else []) + \
            [f"{label}_open_closed_disagreement" for label in labels]
    return names


def agreement_block(texts: list[str], open_transcripts: list[list[str]], open_ok: list[np.ndarray],
                    closed_transcripts: list[list[str]] | None = None,
                    closed_ok: list[np.ndarray] | None = None) -> np.ndarray:
    """float64 [rows, len(agreement_names(...))]: rows of expected texts, each backbone's open (and
    closed) transcripts and the rows it has evidence for; NaN where either side has none."""
    columns = []

    def pair(xs, x_ok, ys, y_ok):
        return [disagreement(t, x, y) if xo and yo and t else np.nan
                for t, x, xo, y, yo in zip(texts, xs, x_ok, ys, y_ok)]
    if len(open_transcripts) > 1:
        columns.append(pair(open_transcripts[0], open_ok[0], open_transcripts[1], open_ok[1]))
    if closed_transcripts is not None:
        if len(closed_transcripts) > 1:
            columns.append(pair(closed_transcripts[0], closed_ok[0], closed_transcripts[1], closed_ok[1]))
        columns += [pair(o, oo, c, co) for o, oo, c, co in zip(open_transcripts, open_ok, closed_transcripts,
                                                               closed_ok)]
    return np.array(columns, np.float64).T.reshape(len(texts), len(columns))
