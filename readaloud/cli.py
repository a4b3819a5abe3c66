"""Command-line plumbing shared by the entry-point scripts (they stay a few lines each)."""
from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data", help="data folder in the competition layout (default: data)")
    p.add_argument("--assets", default="assets", help="folder of trained models and configs (default: assets)")
    p.add_argument("--tts_dir", default="tts_data", help="cache of synthesized references (default: tts_data)")


def parse_overrides(rest: list[str]) -> dict[str, str]:
    """['--lr', '2e-5', '--optim.weight_decay=0.1'] -> {'lr': '2e-5', 'optim.weight_decay': '0.1'}."""
    out, i = {}, 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}: options look like --key value")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            value, i = rest[i + 1], i + 2
        else:
            value, i = "true", i + 1  # a bare flag switches a boolean on
        out[key] = value
    return out


def train_variant_main(variant: str, argv: list[str] | None = None) -> None:
    """Entry point of train_model<variant>.py: train one fold of one registered variant."""
    from .variants import VARIANTS
    from .training import TrainingAborted, train_fold
    p = argparse.ArgumentParser(
        description=f"Train variant {variant} ({VARIANTS[variant]['description']}) on one fold. "
                    "Any config key can be overridden: --lr 2e-5, --optim.weight_decay 0.01, --epochs 3 "
                    "(see readaloud/config.py for all keys).")
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--n_folds", type=int, default=6)
    add_common(p)
    p.add_argument("--force", action="store_true", help="retrain even if this fold is finished")
    p.add_argument("--restart", action="store_true", help="ignore the fold's last checkpoint and start over")
    p.add_argument("--resume", default=None, help="resume from this checkpoint instead of the fold's last one")
    p.add_argument("--quiet", action="store_true", help="hide the config/environment printout and per-epoch logs")
    p.add_argument("--no_progress", action="store_true", help="no progress bars (e.g. when run by train.py)")
    args, rest = p.parse_known_args(argv)
    try:
        overrides = parse_overrides(rest)
        train_fold(variant, args.fold, args.n_folds, args.data, args.assets, args.tts_dir, overrides,
                   force=args.force, restart=args.restart, resume=args.resume, quiet=args.quiet,
                   progress=not args.no_progress)
    except ConfigError as exc:
        p.error(str(exc))
    except TrainingAborted as exc:
        logging.getLogger("readaloud").error(str(exc))
        sys.exit(3)
