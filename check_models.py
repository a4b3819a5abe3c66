"""CV log loss per model and fold; flags broken, missing and outlier folds.

    python check_models.py [--assets assets] [--data data] [--models a,b] [--retrain [--jobs 2]]

Prints a table (rows: models; columns: folds and the pooled out-of-fold log loss), the exact
command that retrains each flagged fold (with the saved config its model was trained with),
and with --retrain runs them, --jobs at a time like train.py. Writes assets/cv_logloss.png.
Exit code 1 when a fold needs attention. The fold count is the data set's fold file's
(--n_folds, if given, must agree); without a fold file, the one the folds' summaries record.
"""
import argparse
import sys
from pathlib import Path

from readaloud.cli import add_common, add_ray_options
from readaloud.layout import FoldPaths, saved_folds
from readaloud.pipeline.checking import check, render_table, retrain_commands, retrain_specs
from readaloud.prep.folds import FoldFileError, resolve_n_folds
from readaloud.variants import VARIANTS


def fold_count(data: str, asked: int | None, assets: Path) -> int:
    """The fold file's count; with no fold file, the largest the trained folds' summaries record."""
    try:
        return resolve_n_folds(data, asked)
    except FoldFileError:
        recorded = [(p.read_summary() or {}).get("n_folds") for p in saved_folds(assets)]
        recorded = [k for k in recorded if isinstance(k, int)]
        if asked is None and recorded:
            return max(recorded)
        raise


def trained_models(assets: Path, n_folds: int) -> list[str]:
    """Registered variants with any fold's files or run folder, then others the summaries name."""
    found = [m for m in VARIANTS if any(FoldPaths(assets, m, f).checkpoint.exists()
                                        or FoldPaths(assets, m, f).run_dir.exists() for f in range(n_folds))]
    return found + sorted({p.variant for p in saved_folds(assets)} - set(VARIANTS))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common(p)
    p.add_argument("--n_folds", type=int, default=None, help="a check: the fold file's count (default: read from it)")
    p.add_argument("--models", "--variants", dest="models", default=None,
                   help="comma-separated variants (default: every variant with files in assets)")
    p.add_argument("--retrain", action="store_true", help="run the retrain commands now")
    p.add_argument("--jobs", type=int, default=2, help="folds retrained at once (default: %(default)s)")
    add_ray_options(p)  # --retrain --ray [ADDRESS]: the folds as Ray tasks, like train.py --ray
    args = p.parse_args()
    assets = Path(args.assets)
    try:
        n_folds = fold_count(args.data, args.n_folds, assets)
    except FoldFileError as exc:
        p.error(str(exc))
    models = args.models.split(",") if args.models else trained_models(assets, n_folds)
    if not models:
        print(f"no trained models in {assets}; run train.py first")
        sys.exit(1)
    table, todo = check(assets, models, n_folds, args.data)
    print(render_table(table, assets))
    try:
        from readaloud.plots import plot_cv_bars
        ok = table[table.status == "ok"]
        if len(ok):
            print(f"plot: {plot_cv_bars(ok, assets / 'cv_logloss.png')}")
    except Exception as exc:
        print(f"(no plot: {exc})")
    if not todo:
        print("all folds OK")
        return
    print("\nfolds to retrain:")
    for issue, cmd in zip(todo, retrain_commands(todo, n_folds, args.data, args.assets)):
        print(f"  {issue.model} fold {issue.fold}: {str(issue).splitlines()[0][:160]}\n    {cmd}")
    if args.retrain:
        from readaloud.pipeline.runner import run_fold_jobs
        from readaloud.ray_jobs import run_fold_jobs_on_ray
        specs = retrain_specs(todo, n_folds, assets)
        if args.ray is not None:
            results = run_fold_jobs_on_ray(specs, args.data, args.assets, args.tts_dir, address=args.ray,
                                           cpus_per_fold=args.cpus_per_fold, gpus_per_fold=args.gpus_per_fold)
        else:
            results = run_fold_jobs(specs, args.data, args.assets, args.tts_dir, jobs=args.jobs)
        failed = [k for k, code in results.items() if code != 0]
        print(f"{len(results) - len(failed)}/{len(results)} folds retrained" +
              (f"; failed: {', '.join(failed)}" if failed else ""))
        sys.exit(1 if failed else 0)
    sys.exit(1)


if __name__ == "__main__":
    main()
