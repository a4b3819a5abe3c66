"""Write a synthetic screener data set (competition layout) to try the pipeline without real data.

    python make_demo_data.py --out data --n-train 3000 --n-test 600 --seed 0 --workers 2
"""
from __future__ import annotations

import argparse
import sys

from readaloud.demo import generator as demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the CSVs and wavs (created if missing)")
    parser.add_argument("--n-train", type=int, default=3000, help="training clips (default 3000)")
    parser.add_argument("--n-test", type=int, default=600, help="test clips (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="same seed and sizes give identical files")
    parser.add_argument("--workers", type=int, default=1, help="synthesis processes (output does not depend on it)")
    parser.add_argument("--flip-rate", type=float, default=demo.DEFAULT_FLIP_RATE,
                        help="share of labels flipped to mimic scorer disagreement (default 0.03)")
    parser.add_argument("--overwrite", action="store_true", help="replace a data set already in --out")
    args = parser.parse_args(argv)
    try:
        demo.run(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                 workers=args.workers, overwrite=args.overwrite, flip_rate=args.flip_rate)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
