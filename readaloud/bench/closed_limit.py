"""The closed decode's length limit (members/gbm/closed.py closed_max_length): its time and what it changes.

    python -m readaloud.bench.closed_limit --data DIR [--n 200] [--backbones whisper-tiny.en,whisper-base]
                                           [--threads 1] [--out bench_out]

For each clip of a seeded sample of DIR's training table (rows with an expected text): one encoder
pass, then the closed decode over its task's words twice, taking turns clip by clip (so load from
elsewhere falls on both alike): once with the open decode's limit (AsrSettings.max_length, what
every closed decode had before the limit) and once with the clip's own limit. Counts the
transcripts that differ, the unlimited ones that ran to the open limit (loops), and the rows whose
closed features differ where a tree could tell: exact match, or a word or phoneme edit rate below 1
on either side (above 1 both ways, a cut loop is as wrong as the whole one). Writes
<out>/closed_limit.md and .json.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import write_report

MATTERS = ("exact_match", "word_edit_rate", "phone_edit_rate")


def compare(backbone: str, rows, data: Path, threads: int) -> dict:
    """Seconds of closed decoding without and with the limit, and what the limit changed."""
    from ..audio import AudioError, load_audio
    from ..members.gbm.evidence import ClosedRequest, WhisperEvidence, expected_texts, text_comparison
    from ..members.gbm.closed import clip_requests, task_words
    model = WhisperEvidence(backbone, threads=threads, workers=1)
    requests = clip_requests(rows, model, task_words(rows))
    free_s = limited_s = 0.0
    n = changed = loops = feature_changed = 0
    free_tokens = limited_tokens = 0
    examples = []
    for name, task, text in zip(rows["filename"].astype(str), rows["task"].astype(str), expected_texts(rows)):
        try:
            encoded = model.encode([load_audio(data / name)])
        except AudioError:
            continue
        limited = requests[name, task, text]
        free = ClosedRequest(limited.vocabulary, limited.suppress, model.settings.max_length)
        t = time.perf_counter()
        a = model.closed_decode(encoded, free)[0]
        free_s += time.perf_counter() - t
        t = time.perf_counter()
        b = model.closed_decode(encoded, limited)[0]
        limited_s += time.perf_counter() - t
        n += 1
        ta, tb = (len(model.tokenizer.encode(" " + x, add_special_tokens=False).ids) if x else 0 for x in (a, b))
        free_tokens, limited_tokens = free_tokens + ta, limited_tokens + tb
        loops += ta >= model.settings.max_length // 2 - 1
        if a != b:
            changed += 1
            fa, fb = text_comparison(text, a), text_comparison(text, b)
            if any(min(fa[k], 1.0) != min(fb[k], 1.0) for k in MATTERS):
                feature_changed += 1
                if len(examples) < 5:
                    examples.append({"expected": text, "unlimited": a, "limited": b})
    return {"clips": n, "unlimited_s": free_s, "limited_s": limited_s, "changed": changed, "loops": loops,
            "features_changed": feature_changed, "mean_tokens_unlimited": free_tokens / max(n, 1),
            "mean_tokens_limited": limited_tokens / max(n, 1), "examples": examples}


def markdown(report: dict) -> str:
    lines = [f"Closed decodes of {report['n']} rows of `{report['data']}` ({report['threads']} thread(s)), "
             f"without and with the length limit:", "",
             "| backbone | clips | closed decode s, no limit | with the limit | speed-up | mean tokens (no limit / limit) "
             "| ran to the open limit | transcripts changed | features changed below 1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for backbone, r in report["backbones"].items():
        lines.append(f"| {backbone} | {r['clips']} | {r['unlimited_s']:.1f} | {r['limited_s']:.1f} "
                     f"| {r['unlimited_s'] / max(r['limited_s'], 1e-9):.2f}x "
                     f"| {r['mean_tokens_unlimited']:.1f} / {r['mean_tokens_limited']:.1f} | {r['loops']} "
                     f"| {r['changed']} | {r['features_changed']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--data", default="data")
    p.add_argument("--n", type=int, default=200, help="rows (seeded sample of train_metadata.csv)")
    p.add_argument("--backbones", default="whisper-tiny.en,whisper-base")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the one clip at a time")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    from .asr_paths import sample_rows
    data = Path(args.data)
    rows = sample_rows(data, args.n)
    if "task" not in rows.columns:
        raise SystemExit(f"{data}/train_metadata.csv has no 'task' column: the closed vocabulary is per task")
    report = {"data": str(data), "n": len(rows), "threads": args.threads, "backbones": {}}
    for backbone in [b.strip() for b in args.backbones.split(",") if b.strip()]:
        report["backbones"][backbone] = compare(backbone, rows, data, args.threads)
        write_report(args.out, "closed_limit", report, markdown(report))
    return write_report(args.out, "closed_limit", report, markdown(report))


if __name__ == "__main__":
    main()
