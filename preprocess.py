"""Prepare a data folder once: TTS references, cached log-mel features, the fold file.

    python preprocess.py [--data data] [--tts_dir tts_data] [--n_folds 6] [--tts espeak:en-us+f3] [--workers 2]
                         [--fold_by stratified|voice | --groups FILE] [--fold_seed N] [--corrections FILE]

Idempotent: a rerun synthesizes and decodes only what is not cached yet. --corrections FILE (a
filename,score CSV, as the review page of infer.py --report downloads it) first corrects the labels
of training clips and adds test clips to training (readaloud/corrections.py); then retrain with
train.py --force.
"""
import argparse
import logging
import time
from pathlib import Path

from readaloud.cli import add_common
from readaloud.corrections import apply_corrections, extend_folds
from readaloud.data import DataError, load_split
from readaloud.features import FeatureParams
from readaloud.layout import bad_clips_path, fold_path
from readaloud.prep.folds import SCHEMES, load_or_create_folds, mark_current, read_groups
from readaloud.prep.prepare import ensure_clip_features, ensure_references
from readaloud.prep.references import DEFAULT_TTS


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common(p)
    p.add_argument("--n_folds", type=int, default=6,
                   help="folds of the data set (the fold file every later step reads; default: %(default)s)")
    p.add_argument("--tts", default=DEFAULT_TTS, help="TTS engine spec (default: %(default)s)")
    p.add_argument("--n_mels", type=int, default=80, help="mel bins (128 for whisper-large-v3)")
    p.add_argument("--workers", type=int, default=2, help="processes decoding audio")
    p.add_argument("--retry_bad", action="store_true", help="try clips listed as unusable again")
    p.add_argument("--fold_by", choices=SCHEMES, default=None,
                   help="stratified (default): by task and score; voice: one voice cluster per fold, so "
                        "out-of-fold scores are for unheard voices; groups: see --groups "
                        "(readaloud/prep/folds.py)")
    p.add_argument("--fold_seed", type=int, default=None,
                   help="seed of a new fold file's draw (default 42); another seed than the file's is an error")
    p.add_argument("--groups", default=None, metavar="FILE",
                   help="CSV with columns filename,group (or filename,speaker): each group (e.g. a child) "
                        "lies inside one fold, so out-of-fold scores are for unheard children")
    p.add_argument("--corrections", default=None, metavar="FILE",
                   help="CSV filename,score (the review page's corrections.csv): corrects training labels, adds "
                        "test clips to training (data folder's CSVs rewritten, first versions kept, changes logged "
                        "in corrections_log.csv)")
    args = p.parse_args()
    if args.groups and args.fold_by not in (None, "groups"):
        p.error(f"--groups makes 'groups' folds; it cannot be combined with --fold_by {args.fold_by}")
    if args.fold_by == "groups" and not args.groups:
        p.error("--fold_by groups needs --groups FILE")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    params = FeatureParams(n_mels=args.n_mels)
    applied = None
    if args.corrections:
        try:
            applied = apply_corrections(args.data, args.corrections)
        except (OSError, DataError) as exc:
            raise SystemExit(f"preprocess.py --corrections: {exc}") from None
        print("\n".join(applied.lines()))
    train = load_split(args.data, "train").meta
    groups = None
    if args.groups:
        try:  # checked before the slow part: every training clip needs its group
            groups = read_groups(args.groups)
            n_groups = groups.for_meta(train).nunique()
        except (OSError, ValueError) as exc:
            raise SystemExit(f"preprocess.py --groups: {exc}") from None
        print(f"groups: column '{groups.column}' of {groups.path} ({n_groups} groups in the training clips)")
    texts = list(train["expected_text"])
    names = list(train["filename"])
    if (Path(args.data) / "test_metadata.csv").exists():
        test = load_split(args.data, "test").meta
        texts += list(test["expected_text"])
        names += list(test["filename"])
    bank = ensure_references(args.tts_dir, args.tts, texts, params)
    store, bad = ensure_clip_features(args.data, names, params, workers=args.workers, retry_bad=args.retry_bad)
    if applied is not None:  # also places clips a failed earlier run added but could not place
        extend_folds(args.data, args.n_folds, train, groups)
    try:
        folds = load_or_create_folds(args.data, train, args.n_folds, args.fold_by, clips=store, groups=groups,
                                     seed=args.fold_seed)
    except ValueError as exc:
        raise SystemExit(f"preprocess.py: {exc}") from None
    mark_current(args.data, args.n_folds)  # train, check_models, get_config read the fold count from here
    print(f"references: {len(bank.index)} texts in {bank.root}")
    print(f"clip features: {len(store)} clips, {store.total_frames} frames "
          f"({store.data_path.stat().st_size / 1e6:.1f} MB) in {store.data_path}")
    if bad:
        print(f"unusable clips: {len(bad)} (listed with reasons in {bad_clips_path(args.data)})")
    scheme = "groups" if groups is not None else args.fold_by or "as in the fold file, else stratified"
    print(f"folds: {args.n_folds} ({scheme}) -> "
          f"{fold_path(args.data, args.n_folds)} "
          f"(sizes {folds.value_counts().sort_index().tolist()})")
    if applied is not None and applied.changed:
        print(f"the training labels changed: retrain every fold, e.g. python train.py --data {args.data} --force "
              f"(then get_config.py and infer.py)")
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
