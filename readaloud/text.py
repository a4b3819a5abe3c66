"""Text normalisation and the phoneme vocabulary of the auxiliary CTC objective.

A response scored correct says exactly its expected text, so the expected text's phonemes
are a free transcript: a CTC head learns to hear them, and its score for the expected
phonemes is the comparison signal BCE alone could not find. Phonemes (espeak's own) fit
nonwords and English spelling alike; characters are the fallback without espeak.
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from .tts import phonemize

BLANK = "<blank>"


def normalise_text(text: str) -> str:
    """Lower-case, unicode-normalised, single-spaced: the key of a text's TTS and tokens."""
    text = unicodedata.normalize("NFKC", str(text)).lower().strip()
    return re.sub(r"\s+", " ", text)


@lru_cache(maxsize=100_000)
def text_units(text: str, unit: str = "phoneme") -> tuple[str, ...]:
    """The token sequence of a text: espeak IPA phonemes, or letters (`unit="char"`)."""
    text = normalise_text(text)
    if unit == "phoneme":
        units = tuple(phonemize(text))
        if units:
            return units
    return tuple(c for c in text if c.isalnum() or c == "'")


class Vocab:
    """Token <-> id, id 0 being the CTC blank. Built from training texts; unknown tokens drop."""

    def __init__(self, tokens: list[str], unit: str = "phoneme"):
        self.unit = unit
        self.tokens = [BLANK] + [t for t in tokens if t != BLANK]
        self.ids = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, texts, unit: str = "phoneme") -> "Vocab":
        seen = sorted({u for t in set(texts) for u in text_units(t, unit)})
        return cls(seen, unit)

    def encode(self, text: str) -> list[int]:
        return [self.ids[u] for u in text_units(text, self.unit) if u in self.ids]

    def __len__(self) -> int:
        return len(self.tokens)

    def to_dict(self) -> dict:
        return {"unit": self.unit, "tokens": self.tokens[1:]}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        return cls(list(d["tokens"]), d["unit"])
