"""Speed of the default ensemble, member by member and in all: items/s of training and inference, cold
(no cache: every per-clip stage computed) and warm (the caches there), and each member's per-clip work
at Whisper's 30 s window with one clip at a time (the straightforward path) against the 10 s window.

    python -m readaloud.bench.speed --data DIR [--models a,b] [--n 16] [--out bench_out/speed.md]

On a copy of DIR's CSVs and clips (none of its caches) in a temporary folder, with its fold file's folds
(2 if none), the pipeline's own code: per member `prepare_shared` (the training clips' caches), one
fold (`run_fold`, the variant's epochs), then `run_inference` on the test clips with that fold, once
cold and once warm; then the same inference with every member at once (the ensemble). Training
items/s = training clips / seconds (cold: caches + the fold; warm: the fold alone, on (k-1)/k of the
clips for the variant's epochs). The per-clip table is readaloud.bench.member_speed on --n clips.
Writes <out> (.md) and its .json twin.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..pipeline.plan import machine_line


def copy_folder(data: Path, dest: Path) -> Path:
    """The data folder's CSVs and clips (no cache) in `dest`, with its fold file's folds (else 2 stratified)."""
    from ..data import load_split
    from ..pipeline.plan import existing_n_folds
    from ..prep.folds import load_or_create_folds, mark_current
    dest.mkdir(parents=True)
    for f in data.iterdir():
        if f.is_file():
            shutil.copy2(f, dest / f.name)
    n_folds = existing_n_folds(data) or 2
    train = load_split(dest, "train").meta
    if existing_n_folds(data):
        shutil.copytree(data / "cache", dest / "cache",
                        ignore=lambda d, names: [n for n in names if not n.startswith("folds")])
    load_or_create_folds(dest, train, n_folds)
    mark_current(dest, n_folds)
    return dest


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def member_rates(variant: str, data: Path, tts: Path, assets: Path) -> dict:
    """Cold and warm seconds of one member's training (caches, one fold) and inference (test clips)."""
    from ..data import load_split
    from ..pipeline.fold_run import run_fold
    from ..pipeline.inference import run_inference
    from ..pipeline.runner import prepare_for_jobs
    from ..prep.folds import data_set_n_folds
    from ..variants import variant_config
    cfg = variant_config(variant)
    n_folds = data_set_n_folds(data)
    n_train = len(load_split(data, "train").meta)
    caches_s = timed(lambda: prepare_for_jobs(data, tts, n_folds, [cfg], progress=True))
    summary = {}
    fold_s = timed(lambda: summary.update(run_fold(variant, 0, data, assets, tts, n_folds=n_folds, quiet=True,
                                                   progress=False)))
    config = {"members": [{"model": variant, "weight": 1.0, "checkpoints": [f"{variant}_0.pth"]}], "bias": 0.0,
              "n_folds": n_folds}
    infer = [timed(lambda: run_inference(data, assets, tts, data.parent / "sub.csv", "cpu", progress=False,
                                         config=config)) for _ in range(2)]
    n_test = len(load_split(data, "test").meta)
    return {"train_clips": n_train, "fold_train_clips": int(summary.get("n_train") or n_train * (n_folds - 1) / n_folds),
            "epochs": summary.get("epochs_run", 1), "caches_s": caches_s, "fold_s": fold_s, "test_clips": n_test,
            "infer_cold_s": infer[0], "infer_warm_s": infer[1], "n_folds": n_folds}


def ensemble_inference(variants: list[str], data: Path, tts: Path, assets: Path, n_folds: int) -> float:
    """Seconds of inference with every member's fold 0 at once, caches warm."""
    from ..pipeline.inference import run_inference
    config = {"members": [{"model": v, "weight": 1.0 / len(variants), "checkpoints": [f"{v}_0.pth"]}
                          for v in variants], "bias": 0.0, "n_folds": n_folds}
    return timed(lambda: run_inference(data, assets, tts, data.parent / "sub.csv", "cpu", progress=False,
                                       config=config))


def markdown(report: dict) -> str:
    lines = ["# Speed of the default ensemble\n", f"machine: {report['machine']} (at the end; at the start "
             f"{', '.join(f'{x:.2f}' for x in report['loadavg_start'])}); data `{report['data']}`; commit "
             f"{report['commit']}; {report['seconds']:.0f} s in all\n",
             "## Training and inference, items/s (cold: no cache; warm: the caches there)\n",
             "| member | training clips | training, cold | training, warm (the fold alone) | test clips | "
             "inference, cold | inference, warm |", "|---|---:|---:|---:|---:|---:|---:|"]
    for v, r in report["members"].items():
        lines.append(f"| {v} | {r['train_clips']} | {r['train_clips'] / (r['caches_s'] + r['fold_s']):.2f} | "
                     f"{r['train_clips'] / r['fold_s']:.2f} | {r['test_clips']} | "
                     f"{r['test_clips'] / r['infer_cold_s']:.2f} | {r['test_clips'] / r['infer_warm_s']:.2f} |")
    e = report["ensemble"]
    lines.append(f"| **ensemble** | {e['train_clips']} | **{e['train_clips'] / e['train_cold_s']:.2f}** | "
                 f"**{e['train_clips'] / e['train_warm_s']:.2f}** | {e['test_clips']} | "
                 f"**{e['test_clips'] / e['infer_cold_s']:.2f}** | **{e['test_clips'] / e['infer_warm_s']:.2f}** |")
    lines.append(f"\nOne fold of {report['n_folds']} per member (the variant's epochs: "
                 + ", ".join(f"{v} {r['epochs']}" for v, r in report["members"].items())
                 + "); the ensemble's training is the members' caches and folds one after the other, its "
                 "cold inference the sum of the members' cold runs less their warm ones plus one warm run of all.\n")
    lines.append("## Per-clip work: Whisper's 30 s window, one clip at a time, against the 10 s window\n")
    ms = report["member_speed"]
    lines += [f"{ms['n']} clips (median {ms['median_clip_s']:.2f} s), all threads.\n",
              "| member | stage | items/s, 30 s window | items/s, 10 s window | speed-up |", "|---|---|---:|---:|---:|"]
    for member, stages in ms["members"].items():
        for name, s in stages.items():
            lines.append(f"| {member} | {name} | {ms['n'] / s['30.0']:.2f} | {ms['n'] / s['10.0']:.2f} | "
                         f"{s['30.0'] / s['10.0']:.2f}x |")
    return "\n".join(lines) + "\n"


def commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[2],
                              capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data")
    p.add_argument("--models", default=None, help="comma-separated variants (default: the default ensemble)")
    p.add_argument("--n", type=int, default=16, help="clips of the per-clip window table")
    p.add_argument("--out", default="bench_out/speed.md")
    args = p.parse_args(argv)
    from ..variants import resolve_models
    from . import member_speed, write_report
    data = Path(args.data)
    if not (data / "train_metadata.csv").is_file() or not (data / "test_metadata.csv").is_file():
        raise SystemExit(f"{data}: needs train_metadata.csv and test_metadata.csv (the competition layout)")
    try:
        variants = resolve_models(args.models)
    except KeyError as exc:
        raise SystemExit(exc.args[0])
    t0, load_start = time.time(), os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="readaloud-speed-"))
    try:
        work = copy_folder(data, root / "data")
        tts, assets = root / "tts", root / "assets"
        members = {v: member_rates(v, work, tts, assets) for v in variants}
        n_folds = next(iter(members.values()))["n_folds"]
        all_warm = ensemble_inference(variants, work, tts, assets, n_folds)
        first = next(iter(members.values()))
        ensemble = {"train_clips": first["train_clips"], "test_clips": first["test_clips"],
                    "train_cold_s": sum(r["caches_s"] + r["fold_s"] for r in members.values()),
                    "train_warm_s": sum(r["fold_s"] for r in members.values()), "infer_warm_s": all_warm,
                    "infer_cold_s": all_warm + sum(r["infer_cold_s"] - r["infer_warm_s"] for r in members.values())}
        speed = member_speed.main(["--data", str(data), "--n", str(args.n), "--models", ",".join(variants),
                                   "--out", str(root / "member_speed")])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {"machine": machine_line(), "data": str(data), "commit": commit(), "seconds": time.time() - t0,
              "n_folds": n_folds, "members": members, "ensemble": ensemble, "member_speed": speed,
              "loadavg_start": load_start}
    out = Path(args.out)
    write_report(out.parent, out.stem, report, markdown(report))
    return report
