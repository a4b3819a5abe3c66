"""model6asr's ASR pass with one clip on every thread (workers=1) against one clip per thread
(the default on CPU): clips per second and whether the evidence is the same.

    python -m readaloud.bench.asr_workers --data data [--n 100] [--repeats 3]
                                          [--backbones whisper-tiny.en,whisper-base] [--threads 0]
                                          [--open_only] [--out bench_out]

Each repeat times the whole table (asr_table, no cache: open greedy decode, teacher-forced log p
and, unless --open_only, the closed-vocabulary decode over the rows' task words) first with one
worker, then with one per thread; the figures of every finished repeat are written at once, so a
long run can be read as it goes. Writes <out>/asr_workers.md and .json.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from . import write_report


def run_table(backbone: str, threads: int, workers: int, rows, data: Path, closed: bool):
    """(seconds, AsrTable, closed transcripts) of one uncached pass over `rows`."""
    from ..members.gbm.evidence import WhisperEvidence, asr_table
    from ..members.gbm.closed import pending_requests, task_words
    model = WhisperEvidence(backbone, threads=threads, workers=workers)
    requests = pending_requests(rows, model, task_words(rows), None) if closed else None
    transcripts: dict = {}
    start = time.perf_counter()
    table = asr_table(rows, data, model, None, progress=False, closed=requests,
                      on_closed=transcripts.update if closed else None)
    return time.perf_counter() - start, table, transcripts


def same(a, b) -> bool:
    (_, ta, ca), (_, tb, cb) = a, b
    return (np.array_equal(ta.X, tb.X, equal_nan=True) and ta.transcripts == tb.transcripts
            and ta.words == tb.words and ca == cb)


def markdown(report: dict) -> str:
    lines = [f"ASR evidence of {report['n']} clips of `{report['data']}` ({report['threads']} threads; "
             f"closed decode: {'no' if report['open_only'] else 'yes'}), clips/s per repeat:", "",
             "| backbone | one clip on all threads | one clip per thread | speed-up | same evidence |",
             "|---|---|---|---|---|"]
    for backbone, runs in report["backbones"].items():
        one = [report["n"] / r["one_worker_s"] for r in runs]
        many = [report["n"] / r["workers_s"] for r in runs]
        lines.append(f"| {backbone} | {' / '.join(f'{x:.2f}' for x in one)} | {' / '.join(f'{x:.2f}' for x in many)} "
                     f"| {' / '.join(f'{m / o:.2f}x' for o, m in zip(one, many))} "
                     f"| {'yes' if all(r['same'] for r in runs) else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data")
    p.add_argument("--n", type=int, default=100, help="clips (seeded sample of train_metadata.csv)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backbones", default="whisper-tiny.en,whisper-base")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: every core this process may use)")
    p.add_argument("--open_only", action="store_true", help="leave out the closed-vocabulary decode")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    from ..whisper.asr import available_cores
    from .asr_paths import sample_rows
    data = Path(args.data)
    rows = sample_rows(data, args.n)
    threads = args.threads or available_cores()
    if threads < 2:
        raise SystemExit("one thread: one worker either way, nothing to compare")
    report = {"data": str(data), "n": len(rows), "threads": threads, "open_only": args.open_only, "backbones": {}}
    for backbone in [b.strip() for b in args.backbones.split(",") if b.strip()]:
        run_table(backbone, threads, threads, rows.head(4), data, not args.open_only)  # untimed warm-up
        runs = report["backbones"][backbone] = []
        for _ in range(args.repeats):
            one = run_table(backbone, threads, 1, rows, data, not args.open_only)
            many = run_table(backbone, threads, threads, rows, data, not args.open_only)
            runs.append({"one_worker_s": one[0], "workers_s": many[0], "same": same(one, many)})
            write_report(args.out, "asr_workers", report, markdown(report))
    return write_report(args.out, "asr_workers", report, markdown(report))


if __name__ == "__main__":
    main()
