"""Clips/s of one training epoch of a variant on the first N clips of a data folder (fold 0's training part).

    python -m readaloud.bench.epoch_speed VARIANT DATA TTS_DIR N_FOLDS N_CLIPS THREADS [OVERRIDES_JSON]

The real trainer: NetworkTrainer.build (which fills a frozen-layer cache if the variant has one;
timed apart), then one run_epoch. Prints one JSON line.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from readaloud.layout import FoldPaths
from readaloud.members.base import FitContext
from readaloud.members.registry import member_for
from readaloud.pipeline.fold_run import load_fold_data
from readaloud.pipeline.trainer import NetworkTrainer, bucket_batches
from readaloud.variants import variant_config


def main(argv: list[str]) -> dict:
    if len(argv) < 6:
        raise SystemExit(__doc__)
    variant, data_dir, tts = argv[:3]
    n_folds, n, threads = (int(a) for a in argv[3:6])
    torch.set_num_threads(threads)
    extra = json.loads(argv[6]) if len(argv) > 6 else {}
    cfg = variant_config(variant, {"epochs": 1, "tensorboard": False, "threads": threads, **extra})
    data = load_fold_data(variant, 0, cfg, data_dir, tts, n_folds, progress=False)
    data.meta = data.meta.iloc[:n]
    ctx = FitContext(paths=FoldPaths(Path(tempfile.mkdtemp()), variant, 0), restart=True, progress=False)
    trainer = NetworkTrainer(member_for(cfg), data, ctx)
    t0 = time.perf_counter()
    trainer.build()
    t_build = time.perf_counter() - t0
    trainer.resume()
    batches = bucket_batches(trainer.train_lengths, cfg.data.batch_max_frames, cfg.data.max_batch_size, True, seed=0)
    t0 = time.perf_counter()
    trainer.run_epoch(0, batches)
    t_epoch = time.perf_counter() - t0
    n_train = len(trainer.train_ds)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = {"variant": variant, "overrides": extra, "train_clips": n_train, "threads": threads,
              "build_s": round(t_build, 1), "epoch_s": round(t_epoch, 1),
              "clips_per_s": round(n_train / t_epoch, 2), "trainable_params_M": round(trainable / 1e6, 2)}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
