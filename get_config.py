"""Fit ensemble weights on out-of-fold predictions -> assets/model_configs.json (+ .pkl twin).

    python get_config.py [--assets assets] [--models a,b] [--max_folds K]

Non-negative weights on the models' OOF logits minimise the OOF log loss; by default they sum
to 1 with no bias (--blend convex), --blend logit frees them and adds a bias.
--max_folds K ships only each model's K best folds (for an inference time limit).
"""
import argparse

from readaloud.cli import add_common
from readaloud.ensemble import build_config, write_config


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common(p)
    p.add_argument("--models", default=None, help="comma-separated (default: every model with OOF files)")
    p.add_argument("--max_folds", type=int, default=None, help="checkpoints to ship per model (default: all)")
    p.add_argument("--blend", choices=("logit", "convex"), default="convex",
                   help="convex (default): weights sum to 1, no bias: cannot sharpen the in-speaker OOF "
                        "confidence, so it holds up on unseen voices; logit: non-negative weights + bias "
                        "(recalibrates on OOF; better only when test children sound like training ones)")
    args = p.parse_args()
    config = build_config(args.assets, args.models.split(",") if args.models else None, args.max_folds,
                          blend=args.blend)
    js, pk = write_config(config, args.assets)
    print(f"{'model':14}{'weight':>10}{'OOF log loss':>14}  folds shipped")
    for m in config["members"]:
        print(f"{m['model']:14}{m['weight']:10.3f}{m['oof_logloss']:14.4f}  {m['folds']}")
    dropped = sorted(set(config["oof_logloss_single"]) - {m["model"] for m in config["members"]})
    if dropped:
        print(f"weight ~0, not shipped: {', '.join(dropped)}")
    best = config["best_single"]
    print(f"\nOOF log loss on {config['n_oof']} clips: ensemble {config['oof_logloss']:.4f} | "
          f"best single ({best}) {config['oof_logloss_single'][best]:.4f} | prior {config['oof_logloss_prior']:.4f}")
    print(f"wrote {js} and {pk}")


if __name__ == "__main__":
    main()
