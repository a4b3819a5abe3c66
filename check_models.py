"""CV log loss per model and fold; flags broken, missing and outlier folds.

    python check_models.py [--assets assets] [--data data] [--n_folds 6] [--models a,b] [--retrain [--jobs 2]]

Prints a table (rows: models; columns: folds and the pooled out-of-fold log loss), the exact
command that retrains each flagged fold (with the options its model was trained with), and with
--retrain runs them, --jobs at a time like train.py. Writes assets/cv_logloss.png. Exit code 1
when a fold needs attention.
"""
import argparse
import sys
from pathlib import Path

from readaloud.checking import check, render_table, retrain_args, retrain_commands, trained_overrides
from readaloud.cli import add_common
from readaloud.variants import VARIANTS


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common(p)
    p.add_argument("--n_folds", type=int, default=6)
    p.add_argument("--models", default=None, help="comma-separated (default: every variant with files in assets)")
    p.add_argument("--retrain", action="store_true", help="run the retrain commands now")
    p.add_argument("--jobs", type=int, default=2, help="folds retrained at once (default: %(default)s)")
    args = p.parse_args()
    assets = Path(args.assets)
    if args.models:
        models = args.models.split(",")
    else:
        found = {f.name.rsplit("_", 1)[0] for f in assets.glob("*_*.pth")} | \
                {d.name.rsplit("_", 1)[0] for d in (assets / "runs").glob("*_*")}
        models = [m for m in VARIANTS if m in found] + sorted(found - set(VARIANTS))
    if not models:
        print(f"no trained models in {assets}; run train.py first")
        sys.exit(1)
    table, todo = check(assets, models, args.n_folds, args.data)
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
    cmds = retrain_commands(todo, args.n_folds, args.data, args.assets)
    print("\nfolds to retrain:")
    for (m, f, reason), cmd in zip(todo, cmds):
        print(f"  {m} fold {f}: {reason.splitlines()[0][:160]}\n    {cmd}")
    if args.retrain:
        from readaloud.runner import run_fold_jobs
        specs = {(m, f): trained_overrides(assets, m, f, args.n_folds) + retrain_args(reason)
                 for m, f, reason in todo}
        results = run_fold_jobs([(m, f, own) for (m, f), own in specs.items()], args.n_folds, args.data,
                                args.assets, args.tts_dir, jobs=args.jobs)
        failed = [k for k, code in results.items() if code != 0]
        print(f"{len(results) - len(failed)}/{len(results)} folds retrained" +
              (f"; failed: {', '.join(failed)}" if failed else ""))
        sys.exit(1 if failed else 0)
    sys.exit(1)


if __name__ == "__main__":
    main()
