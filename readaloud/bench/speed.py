"""Speed benchmark. By default the default ensemble (readaloud/bench/ensemble_speed.py): items/s of each
member's training and inference, cold and warm, and its per-clip Whisper work at a 30 s window against 10 s:

    python -m readaloud.bench.speed --data DIR [--models a,b] [--n 16] [--out bench_out/speed.md]

With --from_scratch, the earlier measurement of the from-scratch pair members: the straightforward
pipeline vs the project's, same model size, same clips:

    python -m readaloud.bench.speed --from_scratch [--data data] [--n 96] [--repeats 3] [--models 3]
                                    [--jobs_models a,b] [--jobs_folds 0,1] [--jobs_epochs 2]
                                    [--thread_scaling small,base] [--skip_jobs] [--skip_paths]
                                    [--out bench_out/speed.md]

straightforward (the seed's way): every item decoded with librosa.load (with resampling) on every
access, the TTS reference too; Whisper's feature extractor pads [reference | pause | response]
to 30 s; the encoder runs on all 1500 positions; fixed-size batches; each ensemble member
decodes and featurizes every clip again.
project: cached float16 log-mel, the encoder on the batch's real length (positions pooled in
pairs), batches filled by frame budget, features computed once for the whole ensemble,
torch.inference_mode.

Each path runs in its own process (so peak memory is its own); figures are medians of
--repeats runs. Also times `train.py --jobs 1` vs `--jobs 2` on the same folds.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _setup(data: str, n: int, threads: int, tts_dir: str = "tts_data"):
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from readaloud.config import ModelConfig
    from readaloud.data import load_split
    from readaloud.prep.dataset import Categories
    from readaloud.prep.prepare import ensure_clip_features, ensure_references
    from readaloud.text import Vocab
    meta = load_split(data, "train").meta.sample(n, random_state=0).reset_index(drop=True)
    refs = ensure_references(tts_dir, "espeak:en-us+f3", meta["expected_text"].unique(), progress=False)
    clips, _ = ensure_clip_features(data, meta["filename"].tolist(), progress=False)
    vocab = Vocab.build(meta["expected_text"])
    cats = Categories.from_meta(meta)
    return meta, refs, clips, vocab, cats, ModelConfig


def run_path(path: str, mode: str, data: str, n: int, n_models: int, threads: int, batch: int,
             tts_dir: str = "tts_data", dims: dict | None = None, barrier: bool = False) -> dict:
    """One measurement in this process: clips/s of `mode` (train | infer) along `path`. With
    `barrier`, the process says "ready" on stdout once set up and waits for a line on stdin
    before its timed part, so that processes started together also measure together."""
    import torch
    import torch.nn.functional as F
    meta, refs, clips, vocab, cats, ModelConfig = _setup(data, n, threads, tts_dir)
    from readaloud.members.registry import build_model
    if barrier:
        print("ready", flush=True)
        sys.stdin.readline()
    t0 = time.perf_counter()
    if path == "straightforward":
        import librosa
        from transformers import WhisperFeatureExtractor
        from readaloud.text import normalise_text
        fe = WhisperFeatureExtractor(feature_size=80)
        cfg = ModelConfig(position_pool=1, score_features=False, match_features=False, bag_weight=0.0)
        models = [build_model(cfg, len(cats.tasks), len(cats.grades), len(vocab)) for _ in range(n_models if mode == "infer" else 1)]

        def features(rows):
            out = []
            for _, r in rows.iterrows():
                resp, _ = librosa.load(Path(data) / r["filename"], sr=16000)
                ref, _ = librosa.load(refs.root / refs.index[normalise_text(r["expected_text"])], sr=16000)
                audio = np.concatenate([ref, np.zeros(3200, np.float32), resp])[: 30 * 16000]
                out.append(fe(audio, sampling_rate=16000, return_tensors="np").input_features[0])
            return torch.from_numpy(np.stack(out))

        labels = torch.tensor(meta["score"].to_numpy(), dtype=torch.float32)
        if mode == "train":
            m = models[0].train()
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
            for s in range(0, n, batch):
                x = features(meta.iloc[s: s + batch])
                hidden = m.encoder(x).last_hidden_state  # Whisper's own forward: 1500 positions
                logit = m.head(torch.cat([hidden.mean(1), torch.zeros(len(x), m.cfg.task_dim + m.cfg.grade_dim)], 1)).squeeze(-1)
                loss = F.binary_cross_entropy_with_logits(logit, labels[s: s + batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
        else:
            with torch.inference_mode():
                for m in models:  # every member decodes and featurizes every clip again
                    m.eval()
                    for s in range(0, n, batch):
                        m.encoder(features(meta.iloc[s: s + batch])).last_hidden_state.mean(1)
    else:
        from readaloud.prep.dataset import PairDataset, bucket_batches, collate
        from readaloud.members.pair.neural import predict_logits
        cfg = ModelConfig(**(dims or {}))
        models = [build_model(cfg, len(cats.tasks), len(cats.grades), len(vocab)) for _ in range(n_models if mode == "infer" else 1)]
        m0 = models[0]
        ds = PairDataset(meta, clips, refs, vocab, cats, m0.max_frames, cfg.pause_frames, m0.frames_per_position)
        if mode == "train":
            m0.train()
            opt = torch.optim.AdamW(m0.parameters(), lr=1e-4)
            for idx in bucket_batches(ds.lengths, 6000, 64, True, 0):
                b = collate([ds.item(i) for i in idx])
                b["ctc_response"] = b["label"] > 0.5
                out = m0(b)
                loss = F.binary_cross_entropy_with_logits(out["logits"], b["label"]) + \
                    0.5 * m0.ctc_loss(out, b) + m0.bag_loss(out, b)
                opt.zero_grad()
                loss.backward()
                opt.step()
        else:
            for m in models:  # features were computed once; each member only runs its forward
                predict_logits(m, ds, torch.device("cpu"), 6000)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"path": path, "mode": mode, "clips": n, "models": n_models if mode == "infer" else 1,
            "seconds": seconds, "clips_per_s": n / seconds, "peak_rss_mb": peak_mb}


def _one_command(path, mode, args, threads, dims, n, barrier: bool = False) -> list[str]:
    return [sys.executable, "-m", "readaloud.bench.speed", "--from_scratch", "--_one", path, mode,
            "--data", str(Path(args.data).resolve()), "--tts_dir", str(Path(args.tts_dir).resolve()),
            "--n", str(n or args.n), "--models", str(args.models),
            "--threads", str(threads or args.threads), "--batch", str(args.batch),
            "--_dims", json.dumps(dims or {})] + (["--_barrier"] if barrier else [])


def _result(returncode: int, stdout: str, stderr: str) -> dict:
    if returncode != 0:
        raise RuntimeError(stderr[-3000:])
    return json.loads(stdout.strip().splitlines()[-1])


def measure(path, mode, args, threads: int | None = None, dims: dict | None = None, n: int | None = None) -> dict:
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run(_one_command(path, mode, args, threads, dims, n), cwd=ROOT, capture_output=True, text=True)
        runs.append(_result(out.returncode, out.stdout, out.stderr))
    best = dict(runs[0])
    best["clips_per_s"] = statistics.median(r["clips_per_s"] for r in runs)
    best["seconds"] = statistics.median(r["seconds"] for r in runs)
    best["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in runs)
    best["all_clips_per_s"] = [round(r["clips_per_s"], 2) for r in runs]
    return best


DEMO_MODELS = "model1mean,model2attn,model3mapd,model5gbm"  # what `make demo` trains


def time_jobs(args) -> dict:
    """Wall time of train.py on the same variants x folds with --jobs 1 and --jobs 2 (fresh assets
    each; the caches both read are filled first, so neither run pays for them), and each fold's
    own time in both runs: --jobs 1 gives a fold both cores, --jobs 2 one core."""
    import shutil

    from readaloud.layout import fold_files, saved_folds
    from readaloud.pipeline.runner import prepare_for_jobs
    from readaloud.prep.folds import resolve_n_folds
    from readaloud.variants import variant_config
    models = [m.strip() for m in args.jobs_models.split(",") if m.strip()]
    cfgs = [variant_config(m) for m in models]
    n_folds = resolve_n_folds(args.data, None if fold_files(args.data) else 6)
    prepare_for_jobs(args.data, args.tts_dir, n_folds, cfgs, progress=False)
    out: dict = {"models": models, "folds": args.jobs_folds, "epochs": args.jobs_epochs, "fold_seconds": {}}
    for jobs in (1, 2):
        assets = Path(args.out).resolve().parent / f"jobs{jobs}_assets"
        shutil.rmtree(assets, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "train.py", "--data", str(Path(args.data).resolve()), "--assets", str(assets),
                        "--tts_dir", str(Path(args.tts_dir).resolve()), "--models",
                        ",".join(models), "--folds", args.jobs_folds, "--jobs", str(jobs),
                        "--epochs", str(args.jobs_epochs)], cwd=ROOT, check=True, capture_output=True,
                       env={**os.environ, "TQDM_DISABLE": "1"})
        out[f"jobs{jobs}_s"] = time.perf_counter() - t0
        out["fold_seconds"][jobs] = {p.stem: (p.read_summary() or {})["seconds"] for p in saved_folds(assets)}
        variant_of = {p.stem: p.variant for p in saved_folds(assets)}
    out["speedup"] = out["jobs1_s"] / out["jobs2_s"]
    per_model = {}
    for m in models:
        t1 = [v for k, v in out["fold_seconds"][1].items() if variant_of.get(k) == m]
        t2 = [v for k, v in out["fold_seconds"][2].items() if variant_of.get(k) == m]
        if t1 and t2:
            per_model[m] = {"jobs1_fold_s": statistics.median(t1), "jobs2_fold_s": statistics.median(t2)}
    out["per_model"] = per_model
    # Two one-core folds at once can beat one two-core fold at a time by at most
    # 2 x (two-core fold time) / (one-core fold time): the bound the threads' own scaling sets.
    sum1 = sum(out["fold_seconds"][1].values())
    sum2 = sum(out["fold_seconds"][2].values())
    out["bound"] = 2 * sum1 / sum2 if sum2 else float("nan")
    return out


def jobs_lines(jobs: dict) -> list[str]:
    n1, n2 = sum(jobs["fold_seconds"][1].values()), sum(jobs["fold_seconds"][2].values())
    epochs = f"{jobs['epochs']} epoch" + ("s" if jobs["epochs"] != 1 else "")
    lines = [f"\n`train.py --jobs 1` vs `--jobs 2` ({', '.join(jobs['models'])}; folds {jobs['folds']} of 6; "
             f"{epochs}; {len(jobs['fold_seconds'][1])} fold runs): "
             f"{jobs['jobs1_s']:.0f}s vs {jobs['jobs2_s']:.0f}s, **{jobs['speedup']:.2f}x**\n",
             "| variant | median fold, --jobs 1 (2 threads), s | median fold, --jobs 2 (1 thread), s | "
             "speed-up of the second thread |", "|---|---|---|---|"]
    for m, r in jobs["per_model"].items():
        lines.append(f"| {m} | {r['jobs1_fold_s']:.1f} | {r['jobs2_fold_s']:.1f} | "
                     f"{r['jobs2_fold_s'] / r['jobs1_fold_s']:.2f}x |")
    lines.append(f"\nFold times are measured inside each fold's process (its start-up excluded: a few seconds "
                 f"when forked from the fork server, 10-15 s for a fresh interpreter). On their own they "
                 f"allow two one-thread folds at a time to be at most 2 x {n1:.0f}s / {n2:.0f}s = "
                 f"**{jobs['bound']:.2f}x** faster than one two-thread fold at a time; overlapping the "
                 f"processes' start-up adds to that, a lone last fold takes from it.")
    return lines


# Encoder sizes for --thread_scaling: the project's default and Whisper-base's encoder.
SCALING_SIZES = {"small": {}, "base": dict(d_model=512, encoder_layers=6, encoder_heads=8, ffn_dim=2048)}


def measure_two_at_once(args, dims: dict, n: int) -> dict:
    """Two one-thread training processes on the two cores, their timed parts started together
    once both are set up: the throughput --jobs 2 has at best on this machine, contention for
    memory and cache included. Each repeat counts both processes' clips over the slower one's time."""
    import tempfile
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryFile("w+") as err0, tempfile.TemporaryFile("w+") as err1:
            procs = [subprocess.Popen(_one_command("project", "train", args, 1, dims, n, barrier=True), cwd=ROOT,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
                     for err in (err0, err1)]
            for proc in procs:  # both set up (or failed: EOF) ...
                while proc.stdout.readline() not in ("ready\n", ""):
                    pass
            for proc in procs:  # ... then both go
                try:
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                except BrokenPipeError:  # it failed; its stderr is reported below
                    pass
            pair = []
            for proc, err in zip(procs, (err0, err1)):
                out = proc.communicate()[0]
                err.seek(0)
                pair.append(_result(proc.returncode, out, err.read()))
        runs.append(sum(r["clips"] for r in pair) / max(r["seconds"] for r in pair))
    return {"clips_per_s": statistics.median(runs), "all_clips_per_s": [round(r, 2) for r in runs]}


def thread_scaling(args) -> dict:
    """Training clips/s of the project's path per encoder size: one process at 1 and at 2 threads
    (how much a single fold already gets from the second core), and two one-thread processes at
    once (what --jobs 2 runs). Their ratio to the two-thread process is the most --jobs 2 can gain
    over --jobs 1, measured rather than derived."""
    out = {}
    for name in [s.strip() for s in args.thread_scaling.split(",") if s.strip()]:
        dims = SCALING_SIZES[name]
        r1, r2 = (measure("project", "train", args, threads=t, dims=dims, n=args.scaling_n) for t in (1, 2))
        pair = measure_two_at_once(args, dims, args.scaling_n)
        out[name] = {"dims": dims, "threads1_clips_per_s": r1["clips_per_s"], "threads2_clips_per_s": r2["clips_per_s"],
                     "speedup": r2["clips_per_s"] / r1["clips_per_s"],
                     "two_at_once_clips_per_s": pair["clips_per_s"], "two_at_once_runs": pair["all_clips_per_s"],
                     "jobs_gain": pair["clips_per_s"] / r2["clips_per_s"]}
    return out


def scaling_lines(scaling: dict, n: int) -> list[str]:
    lines = [f"\nThread scaling of training (project path, {n} clips per process, forward + backward):\n",
             "| encoder | clips/s, 1 process x 1 thread | clips/s, 1 process x 2 threads | second thread | "
             "clips/s, 2 processes x 1 thread at once | most --jobs 2 can gain over --jobs 1 |",
             "|---|---|---|---|---|---|"]
    from readaloud.config import ModelConfig
    default = ModelConfig()
    for name, r in scaling.items():
        d = {"d_model": default.d_model, "encoder_layers": default.encoder_layers, **r["dims"]}
        lines.append(f"| {name} (d_model {d['d_model']}, {d['encoder_layers']} layers) | "
                     f"{r['threads1_clips_per_s']:.1f} | {r['threads2_clips_per_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['two_at_once_clips_per_s']:.1f} | **{r['jobs_gain']:.2f}x** |")
    return lines


def machine() -> str:
    import platform
    import torch
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv=None):
    """The default ensemble's report, or with --from_scratch (or the internal --_one) the earlier one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--from_scratch" not in argv and "--_one" not in argv:
        from .ensemble_speed import main as ensemble_main
        return ensemble_main(argv)
    return from_scratch_main([a for a in argv if a != "--from_scratch"])


def from_scratch_main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data")
    p.add_argument("--n", type=int, default=96, help="clips per measurement")
    p.add_argument("--models", type=int, default=3, help="ensemble members for the inference measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=8, help="fixed batch size of the straightforward path")
    p.add_argument("--jobs_models", default=DEMO_MODELS, help="variants of the --jobs timing (default: the demo's)")
    p.add_argument("--jobs_folds", default="0,1")
    p.add_argument("--jobs_epochs", type=int, default=2, help="epochs per fold in the --jobs timing (the demo's)")
    p.add_argument("--skip_jobs", action="store_true", help="leave out the --jobs timing")
    p.add_argument("--skip_paths", action="store_true", help="leave out the straightforward/project measurement")
    p.add_argument("--tts_dir", default="tts_data")
    p.add_argument("--thread_scaling", default="", metavar="SIZES",
                   help=f"also time training at 1 and 2 threads for these encoder sizes ({', '.join(SCALING_SIZES)})")
    p.add_argument("--scaling_n", type=int, default=192, help="clips per thread-scaling measurement")
    p.add_argument("--_barrier", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_dims", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench_out/speed.md")
    p.add_argument("--_one", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one:
        print(json.dumps(run_path(args._one[0], args._one[1], args.data, args.n, args.models, args.threads, args.batch,
                                  args.tts_dir, json.loads(args._dims), args._barrier)))
        return
    unknown = [x for x in args.thread_scaling.split(",") if x.strip() and x.strip() not in SCALING_SIZES]
    if unknown:
        p.error(f"--thread_scaling: unknown size(s) {unknown}; known: {', '.join(SCALING_SIZES)}")
    os.environ.setdefault("TQDM_DISABLE", "1")
    rows = {} if args.skip_paths else {(path, mode): measure(path, mode, args) for mode in ("train", "infer")
                                       for path in ("straightforward", "project")}
    jobs = None if args.skip_jobs else time_jobs(args)
    scaling = thread_scaling(args) if args.thread_scaling else None
    lines = ["# Speed benchmark\n", f"machine: {machine()}; data `{args.data}`; medians of {args.repeats} runs" +
             (f"; {args.n} clips per path measurement; inference = an ensemble of {args.models} models" if rows else "")
             + "\n"]
    if rows:
        lines += ["| measurement | straightforward | project | project / straightforward |", "|---|---|---|---|"]
    for mode, label in (("train", "training, clips/s (forward + backward)"), ("infer", "ensemble inference, clips/s")):
        if not rows:
            break
        a, b = rows[("straightforward", mode)], rows[("project", mode)]
        lines.append(f"| {label} | {a['clips_per_s']:.2f} | {b['clips_per_s']:.2f} | "
                     f"**{b['clips_per_s'] / a['clips_per_s']:.1f}x** |")
        lines.append(f"| peak memory during {mode}, MB | {a['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} | "
                     f"{b['peak_rss_mb'] / a['peak_rss_mb']:.2f} |")
    if jobs:
        lines += jobs_lines(jobs)
    if scaling:
        lines += scaling_lines(scaling, args.scaling_n)
    if rows:
        lines.append("\nper-run clips/s: " + "; ".join(f"{k[0]} {k[1]}: {v['all_clips_per_s']}" for k, v in rows.items()))
    text = "\n".join(lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    (out.with_suffix(".json")).write_text(json.dumps({"rows": {f"{k[0]}/{k[1]}": v for k, v in rows.items()},
                                                      "jobs": jobs, "thread_scaling": scaling,
                                                      "machine": machine()}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
