"""Clips per second of each Whisper member's per-clip work, with Whisper's 30 s window (before)
and the 10 s window the members now read (after).

    python -m readaloud.bench.member_speed --data data [--n 48] [--models model6asr,model8decoder]
                                           [--threads 0] [--out bench_out]

What a member pays once per clip before any epoch: model6asr the ASR evidence of each of its
backbones (CTranslate2 greedy decode + teacher-forced log p of the expected text), model8decoder
its frozen encoder's output (transformers, float32 on CPU). The two windows take turns clip by
clip after an untimed warm-up, so load from other processes falls on both alike. Training and
inference after that read the caches and do not depend on the window (model8decoder keeps the
clip + 1 s of the encoder's output either way); their seconds per epoch are in each fold's
metrics.csv. Writes <out>/member_speed.md and .json.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from . import write_report

WINDOWS = (30.0, 10.0)


def asr_stage(backbone: str, threads: int):
    """A function clip -> seconds for each window: the member's ASR evidence of one clip."""
    from ..members.gbm.evidence import AsrSettings, WhisperEvidence
    models = {w: WhisperEvidence(backbone, threads=threads, settings=AsrSettings(window_s=w), workers=1)
              for w in WINDOWS}  # one clip at a time on all threads: the per-clip cost

    def run(window: float, audio: np.ndarray, text: str) -> None:
        models[window].evidence([audio], [[text]])
    return run


def encoder_stage(mc, threads: int):
    """The decoder member's frozen encoder on one clip's window (what EncoderCache stores), on the
    engine the member uses (members/decoder/decoder.py make_window_encoder)."""
    import torch
    from transformers import WhisperConfig

    from ..features import FeatureParams, whisper_window_s, window_log_mel
    from ..members.decoder.decoder import make_window_encoder
    from ..members.pair.encoder import load_pretrained_encoder
    from ..whisper.backbones import transformers_dir
    if threads > 0:
        torch.set_num_threads(threads)
    engine = make_window_encoder(mc, torch.device("cpu"), lambda: load_pretrained_encoder(mc.backbone).eval())
    params = FeatureParams(n_mels=WhisperConfig.from_pretrained(transformers_dir(mc.backbone)).num_mel_bins)

    def run(window: float, audio: np.ndarray, text: str) -> None:
        engine(window_log_mel(audio, whisper_window_s(audio.size, window), params)[None])
    return run


def member_stages(variant: str, threads: int) -> dict:
    from ..variants import variant_config
    cfg = variant_config(variant)
    if cfg.model.arch == "gbm" and "asr" in cfg.model.gbm_features:
        return {f"ASR evidence ({b.strip()})": asr_stage(b.strip(), threads)
                for b in cfg.model.asr_backbones.split(",") if b.strip()}
    if cfg.model.arch == "whisperdec":
        return {f"frozen encoder ({cfg.model.backbone})": encoder_stage(cfg.model, threads)}
    return {}


def measure(stages: dict, audios: list[np.ndarray], texts: list[str]) -> dict:
    """{stage: {window: seconds}}: each stage and window runs every clip, taking turns clip by clip."""
    for run in stages.values():
        for w in WINDOWS:
            run(w, audios[0], texts[0])
    seconds = {name: {w: 0.0 for w in WINDOWS} for name in stages}
    from tqdm.auto import tqdm
    for audio, text in tqdm(list(zip(audios, texts)), desc="clips", unit="clip"):
        for name, run in stages.items():
            for w in WINDOWS:
                t = time.perf_counter()
                run(w, audio, text)
                seconds[name][w] += time.perf_counter() - t
    return seconds


def markdown(report: dict) -> str:
    n = report["n"]
    lines = ["# Per-clip work of the Whisper members: 30 s window (before) vs 10 s (after)\n",
             f"{n} clips of `{report['data']}` (median {report['median_clip_s']:.2f} s), {report['threads']} threads; "
             "clips/s = clips / seconds of that stage alone.\n",
             "| member | stage | clips/s, 30 s window | clips/s, 10 s window | speed-up |", "|---|---|---|---|---|"]
    for member, stages in report["members"].items():
        total = {w: sum(s[str(w)] for s in stages.values()) for w in WINDOWS}
        for name, s in stages.items():
            lines.append(f"| {member} | {name} | {n / s['30.0']:.2f} | {n / s['10.0']:.2f} | "
                         f"{s['30.0'] / s['10.0']:.2f}x |")
        if len(stages) > 1:
            lines.append(f"| {member} | **all** | {n / total[30.0]:.2f} | {n / total[10.0]:.2f} | "
                         f"{total[30.0] / total[10.0]:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data")
    p.add_argument("--n", type=int, default=48, help="clips (seeded sample of train_metadata.csv)")
    p.add_argument("--models", default=None, help="comma-separated variants (default: the default ensemble)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: every core this process may use)")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    from ..audio import load_audio
    from ..variants import resolve_models
    from .asr_paths import sample_rows
    data = Path(args.data)
    try:
        models = resolve_models(args.models)
    except KeyError as exc:
        raise SystemExit(exc.args[0])
    rows = sample_rows(data, args.n)
    audios = [load_audio(data / f) for f in rows["filename"]]
    texts = [" ".join(str(t).split()) for t in rows["expected_text"]]
    report = {"data": str(data), "n": len(audios), "threads": args.threads,
              "median_clip_s": float(np.median([a.size / 16000 for a in audios])), "members": {}}
    for variant in models:
        stages = member_stages(variant, args.threads)
        if not stages:
            print(f"{variant}: no per-clip Whisper work, skipped")
            continue
        seconds = measure(stages, audios, texts)
        report["members"][variant] = {name: {str(w): s for w, s in by_window.items()} for name, by_window in seconds.items()}
    return write_report(args.out, "member_speed", report, markdown(report))


if __name__ == "__main__":
    main()
