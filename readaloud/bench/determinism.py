"""Same command, same seed -> same bits: the `make demo` pipeline, shrunk, run twice and compared.

    python -m readaloud.bench.determinism [--keep DIR]

Each repetition runs, from the repository root and in fresh folders, what `make demo` runs:
make_demo_data.py, preprocess.py, pretrain.py (synthetic corpus in 2 spawn workers + CTC
pretraining), train.py (--jobs 2, a neural and a gradient-boosted variant, 2 folds each, no
--threads: the runner picks them, as in make demo), get_config.py. The second repetition uses
other synthesis worker counts and another PYTHONHASHSEED, which must not matter either. Every
artefact that carries numbers is then compared bit for bit: the data set's files, the feature
caches, the synthetic corpus, the pretrained encoder, each fold's checkpoint tensors and OOF
table, the held-out phoneme error rate and the fold log losses. Exit 0 when all agree.

Numbers are only promised for one machine: another CPU (AVX2 vs AVX-512 kernels) or another
torch thread count gives other bits (fold summaries record both). About 3-4 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TINY_MODEL = ["--d_model", "32", "--encoder_layers", "1", "--encoder_heads", "2", "--ffn_dim", "64"]
TIMING_FIELDS = {"seconds", "corpus_seconds", "feature_seconds", "time", "elapsed"}


def run(repo: Path, args: list[str], hash_seed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def repetition(repo: Path, out: Path, data_workers: int, hash_seed: str) -> None:
    """One shrunk `make demo` into `out`."""
    data, assets, tts = out / "data", out / "assets", out / "tts_data"
    backbone = assets / "pretrained_encoder"
    run(repo, ["make_demo_data.py", "--out", str(data), "--n-train", "120", "--n-test", "24", "--seed", "0",
               "--workers", str(data_workers)], hash_seed)
    run(repo, ["preprocess.py", "--data", str(data), "--tts_dir", str(tts), "--n_folds", "2"], hash_seed)
    run(repo, ["pretrain.py", "--out", str(backbone), "--data", str(data), "--n_utterances", "96", "--epochs", "1",
               "--batch_max_frames", "3000", "--workers", "2", "--threads", "2", "--no_progress", *TINY_MODEL],
        hash_seed)
    run(repo, ["train.py", "--data", str(data), "--assets", str(assets), "--tts_dir", str(tts), "--n_folds", "2",
               "--jobs", "2", "--epochs", "1", "--models", "model3mapd,model5gbm", "--backbone", str(backbone),
               "--batch_max_frames", "3000", "--match_dim", "16"], hash_seed)


def tensors_digest(path: Path) -> str:
    """Digest of a checkpoint's tensors (not of the file: pickles may hold paths or times)."""
    import torch
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, weights_only=True, map_location="cpu")
    h = hashlib.sha1()

    def walk(prefix: str, obj) -> None:
        if torch.is_tensor(obj):
            h.update(prefix.encode())
            h.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                walk(f"{prefix}/{k}", obj[k])
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)
    walk("", state)
    return h.hexdigest()


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_FIELDS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def fingerprint(out: Path) -> dict[str, str]:
    """Relative path -> digest of what carries numbers (logs, plots, timings left out)."""
    prints = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = str(path.relative_to(out))
        if "/runs/" in f"/{rel}" or path.suffix in (".png", ".log", ".lock") or "tensorboard" in rel:
            continue
        if path.suffix in (".pth", ".safetensors"):
            prints[rel] = tensors_digest(path)
        elif path.suffix == ".json":  # the run's own folder name is no number
            blob = strip_timing(json.loads(path.read_text().replace(str(out), "<OUT>")))
            if isinstance(blob, dict):
                blob.pop("environment", None)  # same machine by construction; holds the git commit
            prints[rel] = hashlib.sha1(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()
        elif path.name == "pretrain_metrics.csv":
            import pandas as pd
            table = pd.read_csv(path).drop(columns=[c for c in TIMING_FIELDS], errors="ignore")
            prints[rel] = hashlib.sha1(table.to_csv(index=False).encode()).hexdigest()
        elif path.suffix in (".csv", ".txt", ".md"):
            prints[rel] = hashlib.sha1(path.read_text().replace(str(out), "<OUT>").encode()).hexdigest()
        else:
            prints[rel] = hashlib.sha1(path.read_bytes()).hexdigest()
    return prints


def headline(out: Path) -> dict:
    assets = out / "assets"
    pre = json.loads((assets / "pretrained_encoder" / "pretraining.json").read_text())
    folds = {p.stem: round(json.loads(p.read_text())["valid_logloss"], 10)
             for p in sorted(assets.glob("model*_[0-9].json"))}
    return {"holdout_per": pre["holdout_per"], **folds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[2]),
                   help="repository root (where make_demo_data.py is)")
    p.add_argument("--keep", help="run in this folder and keep it (default: a temporary folder)")
    p.add_argument("--compare_only", action="store_true", help="compare the two runs already in --keep")
    args = p.parse_args()
    repo = Path(args.repo).resolve()
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="determinism-"))
    outs = []
    for i, (workers, hash_seed) in enumerate(((1, "1"), (2, "2"))):
        out = base / f"run{i + 1}"
        t0 = time.time()
        if not args.compare_only:
            repetition(repo, out, workers, hash_seed)
        print(f"run {i + 1}: {time.time() - t0:.0f}s, {headline(out)}", flush=True)
        outs.append(out)
    a, b = (fingerprint(o) for o in outs)
    differing = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    print(f"{len(a)} artefacts compared; {len(differing)} differ")
    for k in differing:
        print(f"  differs: {k}")
    same_headline = headline(outs[0]) == headline(outs[1])
    print("held-out phoneme error rate and fold log losses:", "identical" if same_headline else "DIFFER")
    return 0 if not differing and same_headline else 1


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
