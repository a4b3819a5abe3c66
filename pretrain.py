"""Pretrain the small Whisper encoder on synthetic speech (phoneme CTC); saves a backbone.

    python pretrain.py [--out assets/pretrained_encoder] [--data data] [--n_utterances 8000]
                       [--epochs 4] [--workers 2] [--threads 2] [--force]

Then train the pair variants on it, for a language with no pretrained Whisper: `python train.py
--models model1mean,model2attn,model3mapd,model5gbm --backbone assets/pretrained_encoder` (the
same from_pretrained path a real Whisper checkpoint takes; such a folder switches each variant to
its from-scratch settings, readaloud/variants.py). Training texts of --data, if any,
are added to the synthetic corpus (texts only: no audio, no labels). A rerun with the same
settings does nothing.
"""
import argparse
import logging
from pathlib import Path

from readaloud.config import ModelConfig
from readaloud.pipeline.pretraining import PretrainConfig, pretrain_encoder


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="assets/pretrained_encoder")
    p.add_argument("--data", default="data", help="add this data set's training texts to the corpus")
    d = PretrainConfig()
    for name in ("n_utterances", "epochs", "lr", "batch_max_frames", "seed"):
        p.add_argument(f"--{name}", type=type(getattr(d, name)), default=getattr(d, name))
    m = ModelConfig()
    for name in ("d_model", "encoder_layers", "encoder_heads", "ffn_dim", "n_mels"):
        p.add_argument(f"--{name}", type=int, default=getattr(m, name))
    p.add_argument("--dropout", type=float, default=m.dropout)
    p.add_argument("--workers", type=int, default=2, help="processes synthesizing speech")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    texts = []
    meta = Path(args.data) / "train_metadata.csv"
    if meta.exists():
        import pandas as pd
        texts = pd.read_csv(meta, dtype=str, keep_default_na=False)["expected_text"].tolist()
    model_cfg = ModelConfig(d_model=args.d_model, encoder_layers=args.encoder_layers,
                            encoder_heads=args.encoder_heads, ffn_dim=args.ffn_dim, n_mels=args.n_mels,
                            dropout=args.dropout)
    cfg = PretrainConfig(n_utterances=args.n_utterances, epochs=args.epochs, lr=args.lr,
                         batch_max_frames=args.batch_max_frames, seed=args.seed)
    result = pretrain_encoder(args.out, model_cfg, cfg, texts, args.workers, args.threads,
                              progress=not args.no_progress, force=args.force)
    print(f"pretrained encoder in {args.out}: held-out phoneme error rate {result['holdout_per']:.3f}, "
          f"{result['n_utterances']} utterances of {result['n_texts']} texts, {result['seconds']:.0f}s "
          f"(corpus {result['corpus_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
