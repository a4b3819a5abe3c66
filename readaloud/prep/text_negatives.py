"""Negatives from the text side: a clip the child read right, paired with a text the child did not say.

A training row scored 1 says that the child said its expected text. The same clip with one word of
that text swapped for another of the task's words, one word dropped or one word added (for a
one-word answer: another of the task's answers) is a reading the child did not give, so it is
scored 0 with certainty. Such a row differs from a real one only in its text: the voice, the
recording and the child stay fixed, and what a model can learn from the pair is how the clip's
sound fits each word of the text, which is what tells a right reading from a swapped, dropped or
added word. Only a fold's training rows get them; held-out and test rows are never changed.

The changes are drawn from the training rows themselves (the task's words and answers), with a
generator seeded by the run's seed and the row's own filename and text: a row's negatives do not
depend on the order of the rows or on which other rows are scored 1.
"""
from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

CHANGES = ("swap", "drop", "add")
SOURCE_COLUMN = "text_negative_of"   # on a made row: the expected text it was changed from


def _words(text: str) -> list[str]:
    return str(text).split()


def _seed(seed: int, filename: str, text: str) -> list[int]:
    return [seed, zlib.crc32(filename.encode()), zlib.crc32(text.encode())]


def changed_text(text: str, word_pool: list[str], answer_pool: list[str], rng: np.random.Generator) -> str | None:
    """One reading the child did not give: for a text of two words or more, one word swapped for
    another of `word_pool`, dropped or added (the change drawn uniformly); for one word, another
    answer of `answer_pool`. None when the pools offer nothing different."""
    words = _words(text)
    if len(words) < 2:
        others = [a for a in answer_pool if a.lower() != text.strip().lower()]
        return others[int(rng.integers(len(others)))] if others else None
    change = CHANGES[int(rng.integers(len(CHANGES)))]
    at = int(rng.integers(len(words)))
    if change == "drop":
        return " ".join(words[:at] + words[at + 1:])
    others = [w for w in word_pool if w.lower() != words[at].lower()]
    if not others:
        return None
    word = others[int(rng.integers(len(others)))]
    if change == "swap":
        return " ".join(words[:at] + [word] + words[at + 1:])
    at = int(rng.integers(len(words) + 1))
    return " ".join(words[:at] + [word] + words[at:])


def with_text_negatives(rows: pd.DataFrame, per_row: int, seed: int) -> pd.DataFrame:
    """`rows` (training rows with `filename`, `task`, `expected_text`, `score`) followed by
    `per_row` made rows for each row scored 1: the same clip and task with a changed text
    (changed_text), scored 0, its original text in SOURCE_COLUMN (NaN on the real rows). Changes
    that repeat the text or another made text of the row are drawn again, a few times at most."""
    if per_row <= 0 or rows.empty:
        return rows
    made = []
    for task, group in rows.groupby("task", sort=True):
        texts = group["expected_text"].astype(str)
        answers = sorted(set(texts.str.strip()))
        words = sorted({w for t in texts for w in _words(t)})
        for _, row in group[group["score"] > 0.5].iterrows():
            text = str(row["expected_text"]).strip()
            rng = np.random.default_rng(_seed(seed, str(row["filename"]), text))
            seen = {text.lower()}
            for _ in range(per_row):
                for _attempt in range(8):
                    new = changed_text(text, words, answers, rng)
                    if new is not None and new.lower() not in seen:
                        break
                else:
                    continue
                seen.add(new.lower())
                made.append({**row.to_dict(), "expected_text": new, "score": 0, SOURCE_COLUMN: text})
    if not made:
        return rows
    out = pd.concat([rows, pd.DataFrame(made, columns=[*rows.columns, SOURCE_COLUMN])], ignore_index=True)
    return out.astype({"score": rows["score"].dtype})
