"""Transcript and expected-text normalisation, so that a Whisper transcript and the text a child
was asked to say can be compared word for word.

Whisper writes what it hears the way subtitles are written: "Seven, two, nine." or "729." for a
child saying "seven two nine", "Ann's" for "ann's", "21st" for "twenty first". Both sides are
brought to one canonical form of word tokens:

- Unicode NFKC, lower case, curly apostrophes -> "'"; punctuation dropped, but apostrophes inside
  a word stay ("ann's", "let's", "don't" are words); a leading or trailing quote is dropped;
- hyphens and slashes split words ("twenty-one" -> "twenty one", "ice-cream" -> "ice cream");
- numbers become their decimal digits, one token per digit: "5154", "5, 1, 5, 4",
  "five one five four" and "fifty one fifty four" all give 5 1 5 4, "twenty one" and "21" give
  2 1 (so "two one" and "twenty one" compare equal: the price of matching digit spans, which
  Whisper writes either way); "1,000" is one thousand; "$5" -> 5 dollars, "50%" -> 5 0 percent;
- ordinals become one token "<n>th": "first", "1st" -> "1th"; "twenty-first", "21st" -> "21th";
- hesitations Whisper sometimes writes ("um", "uh", "hmm") are dropped; "ok" -> "okay".

Every token remembers the span of surface words (whitespace-separated words of the original text)
it came from, which lets whisper/asr.py copy Whisper's spelling of a word it agrees with.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import numpy as np

UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
ORDINAL_UNITS = ["zeroth", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
                 "ninth"]
ORDINAL_TEENS = ["tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth",
                 "seventeenth", "eighteenth", "nineteenth"]
ORDINAL_TENS = ["", "", "twentieth", "thirtieth", "fortieth", "fiftieth", "sixtieth", "seventieth",
                "eightieth", "ninetieth"]
ORDINAL_SCALES = {"hundredth": 100, "thousandth": 1_000, "millionth": 1_000_000, "billionth": 1_000_000_000}
FILLERS = frozenset({"um", "umm", "uh", "uhh", "uhm", "er", "erm", "ah", "hmm", "hm", "mm", "mmm", "mhm"})
VARIANTS = {"ok": "okay"}
ORDINAL_MARK = "th"

# word -> (kind, value, is_ordinal); kinds: unit, teen, ten, scale
NUMBER_WORDS: dict[str, tuple[str, int, bool]] = {}
for _i, _w in enumerate(UNITS):
    NUMBER_WORDS[_w] = ("unit", _i, False)
    NUMBER_WORDS[ORDINAL_UNITS[_i]] = ("unit", _i, True)
for _i, _w in enumerate(TEENS):
    NUMBER_WORDS[_w] = ("teen", 10 + _i, False)
    NUMBER_WORDS[ORDINAL_TEENS[_i]] = ("teen", 10 + _i, True)
for _i in range(2, 10):
    NUMBER_WORDS[TENS[_i]] = ("ten", 10 * _i, False)
    NUMBER_WORDS[ORDINAL_TENS[_i]] = ("ten", 10 * _i, True)
for _w, _v in SCALES.items():
    NUMBER_WORDS[_w] = ("scale", _v, False)
for _w, _v in ORDINAL_SCALES.items():
    NUMBER_WORDS[_w] = ("scale", _v, True)

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u00b4": "'"})
_PIECE = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_DIGIT_ORDINAL = re.compile(r"^(\d+)(?:st|nd|rd|th)$")


@dataclass(frozen=True)
class Token:
    """A canonical word and the surface words [first, last] of the original text it came from."""
    text: str
    first: int
    last: int


def surface_words(text: str) -> list[str]:
    """The original text's words as written (split on whitespace), what spans index into."""
    return unicodedata.normalize("NFKC", str(text)).split()


def _pieces(word: str) -> list[str]:
    """Lower-case word pieces of one surface word, punctuation, hyphens and quotes removed."""
    w = unicodedata.normalize("NFKC", word).lower().translate(_APOSTROPHES)
    w = w.replace("&", " and ")
    w = re.sub(r"\$(\d[\d,]*(?:\.\d+)?)", r"\1 dollars ", w)
    w = re.sub(r"(\d)\s*%", r"\1 percent ", w)
    w = _THOUSANDS.sub("", w)
    return _PIECE.findall(w)


def normalise_tokens(text: str) -> list[Token]:
    """Canonical tokens of `text` with the surface-word span of each (see the module docstring)."""
    stream = [(p, i) for i, word in enumerate(surface_words(text)) for p in _pieces(word)]
    stream = [(VARIANTS.get(p, p), i) for p, i in stream if p not in FILLERS]
    out: list[Token] = []
    k = 0
    while k < len(stream):
        piece, i = stream[k]
        ordinal = _DIGIT_ORDINAL.match(piece)
        if ordinal:
            out.append(Token(f"{int(ordinal.group(1))}{ORDINAL_MARK}", i, i))
            k += 1
        elif piece.isdigit():
            out.extend(Token(d, i, i) for d in piece)
            k += 1
        elif piece in NUMBER_WORDS and NUMBER_WORDS[piece][0] != "scale":
            value, is_ordinal, end = _parse_number(stream, k)
            first, last = i, stream[end - 1][1]
            if is_ordinal:
                out.append(Token(f"{value}{ORDINAL_MARK}", first, last))
            else:
                out.extend(Token(d, first, last) for d in str(value))
            k = end
        else:
            out.append(Token(piece, i, i))
            k += 1
    return out


def normalise_words(text: str) -> list[str]:
    """Canonical word tokens of `text`: what exact match and edit distances compare."""
    return [t.text for t in normalise_tokens(text)]


def _parse_number(stream: list[tuple[str, int]], start: int) -> tuple[int, bool, int]:
    """Read one spelled-out number from stream[start:]: (value, is ordinal, index after it).

    A word joins the number only where English allows it ("twenty one", "two hundred and five",
    "nineteen hundred", "three thousand") so "five one five four" is four numbers, and
    "nineteen eighty four" two (19, 84). An ordinal word ends the number.
    """
    total, group = 0, 0
    tens_set = ones_set = hundreds_set = False
    last_scale = None
    k = start
    while k < len(stream):
        word = stream[k][0]
        if word == "and" and (hundreds_set or last_scale) and not (tens_set or ones_set) and k + 1 < len(stream):
            nxt = NUMBER_WORDS.get(stream[k + 1][0])
            if nxt and nxt[0] in ("unit", "teen", "ten") and not (nxt[0] == "unit" and nxt[1] == 0):
                k += 1
                continue
            break
        entry = NUMBER_WORDS.get(word)
        if entry is None:
            break
        kind, value, ordinal = entry
        if k > start and kind == "unit" and value == 0:
            break  # "zero" is a number of its own: "two zero" is 2 0, never 20
        if kind == "unit" and not ones_set:
            group += value
            ones_set = True
        elif kind in ("teen", "ten") and not (tens_set or ones_set):
            group += value
            tens_set = True
            ones_set = kind == "teen"
        elif kind == "scale" and value == 100 and 0 < group < 20 and not hundreds_set:
            group *= 100
            hundreds_set, tens_set, ones_set = True, False, False
        elif kind == "scale" and value > 100 and group and (last_scale is None or value < last_scale):
            total += group * value
            group, last_scale = 0, value
            hundreds_set = tens_set = ones_set = False
        else:
            break
        k += 1
        if ordinal:
            break
    is_ordinal = NUMBER_WORDS.get(stream[k - 1][0], ("", 0, False))[2]
    return total + group, is_ordinal, k


def spoken_text(tokens: list[str]) -> str:
    """Canonical tokens read out as words (digits one by one), e.g. for espeak phonemes."""
    out = []
    for t in tokens:
        if t.isdigit():
            out.append(UNITS[int(t)])
        elif t.endswith(ORDINAL_MARK) and t[:-len(ORDINAL_MARK)].isdigit():
            n = int(t[:-len(ORDINAL_MARK)])
            suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
            out.append(f"{n}{suffix}")
        else:
            out.append(t)
    return " ".join(out)


# ---- comparison ---------------------------------------------------------------------------------

def edit_distance(a, b) -> int:
    """Levenshtein distance between two sequences (lists of words, or strings of characters)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def prefix_edit_distances(a, b) -> np.ndarray:
    """int64 [len(b) + 1]: the Levenshtein distance from `a` to each prefix b[:k], k = 0..len(b)
    (its last entry is edit_distance(a, b), its minimum the distance to b's best-matching start).
    One numpy row per element of `a`: an insertion chain along b is a running minimum of
    (cost - position) + position, so long transcripts cost len(a) vector operations."""
    codes: dict = {}
    a_ids = np.array([codes.setdefault(x, len(codes)) for x in a], np.int64)
    b_ids = np.array([codes.setdefault(y, len(codes)) for y in b], np.int64)
    position = np.arange(len(b_ids) + 1, dtype=np.int64)
    row = position.copy()
    for i, x in enumerate(a_ids, 1):
        best = np.empty_like(row)
        best[0] = i
        best[1:] = np.minimum(row[1:] + 1, row[:-1] + (b_ids != x))
        row = np.minimum.accumulate(best - position) + position
    return row


def matched_pairs(a: list[str], b: list[str]) -> list[tuple[int, int]]:
    """Index pairs (i, j) with a[i] == b[j] on one minimal-edit alignment of a and b."""
    n, m = len(a), len(b)
    cost = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        cost[i][0] = i
    for j in range(m + 1):
        cost[0][j] = j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i][j] = min(cost[i - 1][j] + 1, cost[i][j - 1] + 1,
                             cost[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    pairs = []
    i, j = n, m
    while i > 0 and j > 0:
        if a[i - 1] == b[j - 1] and cost[i][j] == cost[i - 1][j - 1]:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif cost[i][j] == cost[i - 1][j - 1] + 1:
            i, j = i - 1, j - 1
        elif cost[i][j] == cost[i - 1][j] + 1:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]
