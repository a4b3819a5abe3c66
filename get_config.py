"""Fit ensemble weights on out-of-fold predictions -> assets/model_configs.json (+ .pkl twin).

    python get_config.py [--assets assets] [--models a,b] [--max_folds K]

Non-negative weights on the models' OOF logits minimise the OOF log loss: free and with a bias
(--blend logit) when the folds are voice or groups folds, summing to 1 without a bias (--blend convex)
when they are stratified (--blend auto, the default; see readaloud/ensemble.py).
--max_folds K ships only each model's K best folds (for an inference time limit).
"""
import argparse

from readaloud.cli import add_common
from readaloud.pipeline.ensemble import build_config, write_config


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common(p)
    p.add_argument("--models", "--variants", dest="models", default=None,
                   help="comma-separated variants (default: every variant with OOF files)")
    p.add_argument("--max_folds", type=int, default=None, help="checkpoints to ship per model (default: all)")
    p.add_argument("--blend", choices=("auto", "logit", "convex"), default="auto",
                   help="logit: non-negative weights + bias (recalibrates on OOF); convex: weights sum to 1, "
                        "no bias (cannot sharpen); auto (default): logit with voice or groups folds "
                        "(OOF = unheard voices or children), convex with stratified folds "
                        "(OOF = voices heard in training)")
    args = p.parse_args()
    config = build_config(args.assets, args.models.split(",") if args.models else None, args.max_folds,
                          blend=args.blend, data_dir=args.data)
    js, pk = write_config(config, args.assets)
    print(f"{'model':14}{'weight':>10}{'OOF log loss':>14}  folds shipped")
    for m in config["members"]:
        print(f"{m['model']:14}{m['weight']:10.3f}{m['oof_logloss']:14.4f}  {m['folds']}")
    dropped = sorted(set(config["oof_logloss_single"]) - {m["model"] for m in config["members"]})
    if dropped:
        print(f"weight ~0, not shipped: {', '.join(dropped)}")
    best = config["best_single"]
    print(f"\nOOF log loss on {config['n_oof']} clips: ensemble {config['oof_logloss']:.4f} "
          f"(blend fitted without each fold in turn: {config['oof_logloss_cross_fitted']:.4f}) | "
          f"best single ({best}) {config['oof_logloss_single'][best]:.4f} | prior {config['oof_logloss_prior']:.4f}")
    print(f"blend: {config['blend']} (folds: {config['fold_by']})")
    print(f"wrote {js} and {pk}")


if __name__ == "__main__":
    main()
