"""Leave-one-speaker-out: the quality benchmark once per held-out speaker, then one table.

    python -m readaloud.bench.loso --recordings ../shared/data/fsdd/recordings \\
        --speakers jackson,nicolas,george,yweweler --out loso_out [quality options...]

For each speaker S, the data set builder (default ../shared/bench/digit_span.py) writes a
screening set whose training items come from the other speakers and whose test items come
from S only; `readaloud.bench.quality` then runs the whole pipeline on it. Every option this
command does not know (--models, --epochs, --n_folds, --backbone, any config key) is passed
on to the quality benchmark unchanged, so all speakers get the same recipe. Finished folds
and data sets are reused, so a rerun only fills in what is missing.

Words never trained on: `--train_words 0,1,2,3,4 --test_words 5,6,7,8,9` builds each split with
readaloud/bench/word_span.py instead, so the training speakers say only the first words and the
held-out speaker only the second (a new voice saying new words).

Writes <out>/loso.md, loso.json and loso.png: test log loss per held-out speaker and the mean,
for the prior, every member and the ensemble, and each predictor's recalibrated floor (the log loss
after the best monotone map fitted on the held-out speaker's own labels: what calibration cannot fix).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BUILDER_CANDIDATES = (ROOT.parent / "shared" / "bench" / "digit_span.py",   # beside the repo
                      Path.cwd().parent / "shared" / "bench" / "digit_span.py")
DEFAULT_BUILDER = next((c for c in BUILDER_CANDIDATES if c.exists()), BUILDER_CANDIDATES[0])


WORD_SPAN_BUILDER = Path(__file__).resolve().with_name("word_span.py")


def build_split(builder: Path, recordings: list[str], train: list[str], test: list[str], n_train: int,
                n_test: int, seed: int, out: Path, extra: list[str] = ()) -> Path:
    if (out / "test_labels.csv").exists():
        return out
    cmd = [sys.executable, str(builder), "--recordings", *recordings, "--train-speakers", ",".join(train),
           "--test-speakers", ",".join(test), "--n-train", str(n_train), "--n-test", str(n_test),
           "--seed", str(seed), "--out", str(out), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def loso_table(results: dict[str, dict]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """{speaker: quality summary} -> (row names, {row: {speaker: loss, 'mean': loss}})."""
    speakers = list(results)
    rows: list[str] = []
    for summary in results.values():
        rows += [r for r in summary["test_logloss"] if r not in rows]
    table = {}
    for r in rows:
        vals = {s: results[s]["test_logloss"].get(r, {}).get("overall", float("nan")) for s in speakers}
        vals["mean"] = float(np.mean([vals[s] for s in speakers]))
        table[r] = vals
    return rows, table


def recalibrated_table(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """{speaker: quality summary} -> {predictor: {speaker: recalibrated log loss, 'mean': ...}}, for the
    predictors every speaker's summary decomposes (summaries written before the decomposition have none):
    the log loss after the best monotone map fitted on that speaker's own test labels, the floor no
    calibration can go under."""
    parts = [summary.get("decomposition") or {} for summary in results.values()]
    names = [n for n in (parts[0] if parts else {}) if all(n in d for d in parts)]
    table = {}
    for name in names:
        vals = {s: float(d[name]["recalibrated"]) for s, d in zip(results, parts)}
        table[name] = {**vals, "mean": float(np.mean(list(vals.values())))}
    return table


def table_lines(corner: str, table: dict[str, dict[str, float]], cols: list[str]) -> list[str]:
    """Markdown rows of a {row: {speaker: loss, 'mean': loss}} table, speakers then the mean as columns."""
    return ([(f"| {corner} | " if corner else "| | ") + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            + [f"| {r} | " + " | ".join(f"{vals[c]:.4f}" for c in cols) + " |" for r, vals in table.items()])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)  # "--tts" passes on
    p.add_argument("--recordings", nargs="+", required=True, help="folder(s) of speaker recordings")
    p.add_argument("--speakers", required=True, help="comma-separated; each is held out once")
    p.add_argument("--out", default="loso_out")
    p.add_argument("--builder", default=str(DEFAULT_BUILDER), help="data set builder script (digit_span.py CLI)")
    p.add_argument("--n-train", type=int, default=2400)
    p.add_argument("--n-test", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma-separated subset of held-out speakers to run now")
    p.add_argument("--train_words", default=None, help="words of the training items (with --test_words: "
                   "the words-never-trained-on split, built by bench/word_span.py)")
    p.add_argument("--test_words", default=None, help="words of the held-out speaker's test items")
    args, passthrough = p.parse_known_args(argv)
    from readaloud.bench import quality
    from readaloud.plots import plot_grouped_losses

    builder, extra = Path(args.builder), []
    if bool(args.train_words) != bool(args.test_words):
        raise SystemExit("--train_words and --test_words go together")
    if args.train_words:
        builder, extra = WORD_SPAN_BUILDER, ["--train-words", args.train_words, "--test-words", args.test_words]
    if not builder.exists():
        raise SystemExit(f"data set builder {builder} not found (pass --builder)")
    speakers = args.speakers.split(",")
    if len(speakers) < 2:
        raise SystemExit("--speakers needs at least two speakers")
    out = Path(args.out)
    results = {}
    for s in speakers:
        folder = out / f"heldout_{s}"
        done = folder / "summary.json"
        if args.only and s not in args.only.split(","):
            if done.exists():
                results[s] = json.loads(done.read_text())
            continue
        data = build_split(builder, args.recordings, [t for t in speakers if t != s], [s], args.n_train,
                           args.n_test, args.seed, folder / "data", extra)
        print(f"\n==== held-out speaker {s} ====", flush=True)
        results[s] = quality.main(["--data", str(data), "--out", str(folder), *passthrough])
    if not results:
        raise SystemExit("nothing to report yet")
    rows, table = loso_table(results)
    cols = list(results) + ["mean"]
    lines = ["# Leave-one-speaker-out: test log loss per held-out speaker\n",
             f"Speakers: {', '.join(speakers)}; {args.n_train} training / {args.n_test} test items each; "
             + (f"training words {args.train_words}, test words {args.test_words} (never trained on); "
                if args.train_words else "") +
             f"options: `{' '.join(passthrough) or '(defaults)'}`\n",
             *table_lines("", {r: table[r] for r in rows}, cols)]
    members = [r for r in rows if not r.startswith("prior") and r != "ensemble"]
    if "ensemble" in table and members:
        best = min(table[m]["mean"] for m in members)
        lines += ["", f"Ensemble mean {table['ensemble']['mean']:.4f} vs best member mean {best:.4f}."]
    floor = recalibrated_table(results)
    if floor:
        lines += ["", "Recalibrated: each speaker's test log loss after the best monotone map fitted on that "
                  "speaker's own test labels (metrics.log_loss_decomposition), a floor that no calibration "
                  "of these scores can go under; a speaker above a target here needs "
                  "better-ranked scores:\n", *table_lines("recalibrated", floor, cols)]
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_grouped_losses({r: {c: table[r][c] for c in cols} for r in rows}, out / "loso.png",
                               title="Leave-one-speaker-out test log loss")
    lines += ["", f"![loso]({plot.name})"]
    (out / "loso.md").write_text("\n".join(lines) + "\n")
    (out / "loso.json").write_text(json.dumps({"speakers": list(results), "table": table, "recalibrated": floor,
                                               "options": passthrough}, indent=1))
    print("\n".join(lines))
    return {"table": table, "rows": rows, "recalibrated": floor}


if __name__ == "__main__":
    main()
