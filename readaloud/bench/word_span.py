"""A word-span screening set whose test words never occur in training: the "words never trained
on" split of leave-one-speaker-out.

    python -m readaloud.bench.word_span --recordings ../shared/data/fsdd/recordings \\
        --train-speakers jackson,nicolas,george --test-speakers yweweler \\
        --train-words 0,1,2,3,4 --test-words 5,6,7,8,9 --n-train 600 --n-test 200 --out DIR

Recordings are named word_speaker_take.wav (FSDD's digit_speaker_index.wav). Each item asks for
1-5 words of its split's word set and plays takes of the speaker saying them, stitched with short
pauses and quiet noise; half the items are said wrongly (a word substituted by another of the
same set, left out, added, or two neighbours swapped). Training items use only --train-words by
the training speakers, test items only --test-words by the held-out speakers, so a model meets the
test words, their spellings and their sounds for the first time at test. The command line is
digit_span.py's (`bench.loso` calls either) plus the two word sets; the layout is the
competition's, with test_labels.csv.
"""
from __future__ import annotations

import argparse
import csv
import random
import string
import wave
from collections import defaultdict
from pathlib import Path

import numpy as np

WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six",
         "7": "seven", "8": "eight", "9": "nine"}
GRADES = ["KG", "1", "2", "3"]
LENGTHS = [1, 2, 2, 3, 3, 4, 4, 5]


def load_bank(folders: list[str], speakers: set[str], words: set[str]) -> dict[str, dict[str, list]]:
    """{speaker: {word: [(int16 audio, rate)]}} of the given speakers and words."""
    bank: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for folder in folders:
        for path in sorted(Path(folder).glob("*.wav")):
            parts = path.stem.split("_")
            if len(parts) != 3:
                raise ValueError(f"{path}: expected a name word_speaker_take.wav")
            word, speaker, _ = parts
            if speaker in speakers and word in words:
                with wave.open(str(path)) as w:
                    if w.getnchannels() != 1 or w.getsampwidth() != 2:
                        raise ValueError(f"{path}: expected 16-bit mono, got {w.getnchannels()} channels, "
                                         f"{8 * w.getsampwidth()}-bit")
                    audio = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
                    bank[speaker][word].append((audio.astype(np.float32), w.getframerate()))
    for speaker in speakers:
        missing = sorted(words - set(bank[speaker]))
        if missing:
            raise ValueError(f"speaker {speaker!r} has no recording of word(s) {', '.join(missing)} in "
                             f"{', '.join(map(str, folders))}")
    return bank


def wrong_response(said: list[str], words: list[str], rng: random.Random) -> list[str]:
    """A wrong response for the expected word list, using only `words`."""
    kinds = ["substitute", "omit", "insert"] + (["swap"] if len(set(said)) > 1 else [])
    kind = rng.choices(kinds, [{"substitute": 0.5, "omit": 0.2, "insert": 0.15, "swap": 0.15}[k] for k in kinds])[0]
    out = list(said)
    if kind == "omit" and len(out) > 1:
        del out[rng.randrange(len(out))]
    elif kind == "insert":
        out.insert(rng.randrange(len(out) + 1), rng.choice(words))
    elif kind == "swap":
        pairs = [i for i in range(len(out) - 1) if out[i] != out[i + 1]]
        i = rng.choice(pairs)
        out[i], out[i + 1] = out[i + 1], out[i]
    else:  # substitute (also a one-word omit, which would be silence)
        i = rng.randrange(len(out))
        out[i] = rng.choice([w for w in words if w != out[i]])
    return out


def stitch(takes: list[np.ndarray], rate: int, rng: random.Random, np_rng: np.random.Generator) -> np.ndarray:
    def pause(lo: float, hi: float) -> np.ndarray:
        return np_rng.normal(0, 30, int(rate * rng.uniform(lo, hi))).astype(np.float32)
    parts = [pause(0.1, 0.4)]
    for take in takes:
        parts += [take, pause(0.05, 0.35)]
    parts.append(pause(0.1, 0.4))
    return np.clip(np.concatenate(parts) * rng.uniform(0.5, 1.2), -32768, 32767).astype(np.int16)


def build(bank, speakers: list[str], words: list[str], n: int, rng: random.Random, np_rng, out: Path,
          used: set[str]) -> list[dict]:
    rows = []
    for _ in range(n):
        speaker = rng.choice(speakers)
        expected = [rng.choice(words) for _ in range(rng.choice(LENGTHS))]
        correct = rng.random() < 0.5
        said = expected if correct else wrong_response(expected, words, rng)
        takes = [rng.choice(bank[speaker][w]) for w in said]
        rates = {r for _, r in takes}
        if len(rates) != 1:
            raise ValueError(f"speaker {speaker!r}: recordings at several sample rates {sorted(rates)}")
        audio = stitch([a for a, _ in takes], rates.pop(), rng, np_rng)
        name = None
        while name is None or name in used:
            name = "".join(rng.choices(string.ascii_lowercase, k=8)) + ".wav"
        used.add(name)
        with wave.open(str(out / name), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(takes[0][1])
            w.writeframes(audio.tobytes())
        rows.append({"filename": name, "task": "word_span", "expected_text": " ".join(WORDS.get(w, w) for w in expected),
                     "grade": rng.choice(GRADES), "score": int(correct)})
    return rows


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recordings", nargs="+", required=True, help="folder(s) of word_speaker_take.wav files")
    p.add_argument("--train-speakers", required=True)
    p.add_argument("--test-speakers", required=True)
    p.add_argument("--train-words", default="0,1,2,3,4", help="words (file-name field) of the training items")
    p.add_argument("--test-words", default="5,6,7,8,9", help="words of the test items; none may be a training word")
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    train_words = [w for w in args.train_words.split(",") if w]
    test_words = [w for w in args.test_words.split(",") if w]
    shared = sorted(set(train_words) & set(test_words))
    if shared:
        p.error(f"word(s) {', '.join(shared)} in both --train-words and --test-words")
    train_speakers, test_speakers = args.train_speakers.split(","), args.test_speakers.split(",")
    rng, np_rng = random.Random(args.seed), np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    train = build(load_bank(args.recordings, set(train_speakers), set(train_words)), train_speakers, train_words,
                  args.n_train, rng, np_rng, out, used)
    test = build(load_bank(args.recordings, set(test_speakers), set(test_words)), test_speakers, test_words,
                 args.n_test, rng, np_rng, out, used)
    meta = ["filename", "task", "expected_text", "grade"]
    write_csv(out / "train_metadata.csv", train, meta)
    write_csv(out / "train_labels.csv", train, ["filename", "score"])
    write_csv(out / "test_metadata.csv", test, meta)
    write_csv(out / "submission_format.csv", [{**r, "score": 0} for r in test], ["filename", "score"])
    write_csv(out / "test_labels.csv", test, ["filename", "score"])  # last: loso's "already built" mark
    print(f"{len(train)} training items (words {','.join(train_words)}; {','.join(train_speakers)}), "
          f"{len(test)} test items (words {','.join(test_words)}; {','.join(test_speakers)}) -> {out}")
    return out


if __name__ == "__main__":
    main()
