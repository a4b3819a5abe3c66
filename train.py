"""Train the chosen model variants x folds, several at a time, then list what finished.

    python train.py [--models model1mean,model3mapd] [--folds 0,2] [--jobs 2]
                    [--epochs E] [--force] [--gpus 0,1] [--data data] [--assets assets] [any --key value]
    python train.py --plan [--clips N --test_clips M] [...]   # hours and disk of each stage, before a run

The fold count is the data set's fold file's (preprocess.py --n_folds K made it); --n_folds,
if given, must agree with it (with no fold file yet, it is the count to make). Data is
prepared first (TTS, features, folds and what the member families share: a no-op after
preprocess.py), then each job runs `train_model<variant>.py` in its own process. Finished
folds are skipped unless --force; unknown options are passed to every job as config
overrides (e.g. --lr 5e-4).
"""
import argparse
import sys

from readaloud.cli import add_common, add_ray_options, parse_overrides
from readaloud.config import ConfigError
from readaloud.layout import unfinished_folds
from readaloud.pipeline.plan import add_plan_options, run_plan
from readaloud.prep.folds import FoldFileError, resolve_n_folds
from readaloud.variants import default_variants, resolve_models, variant_config


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
                                allow_abbrev=False)  # config keys pass on whole: --tts is not --tts_dir
    add_common(p)
    p.add_argument("--models", "--variants", dest="models", default=None,
                   help=f"comma-separated variants, or 'all' (default: the default ensemble, {','.join(default_variants())})")
    p.add_argument("--folds", default=None, help="comma-separated folds (default: all)")
    p.add_argument("--n_folds", type=int, default=None, help="a check: the fold file's count (default: read from it)")
    p.add_argument("--jobs", type=int, default=2, help="jobs at a time (default 2)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--force", action="store_true", help="retrain finished folds")
    p.add_argument("--gpus", default=None, help="e.g. 0,1: one GPU per job via CUDA_VISIBLE_DEVICES")
    add_ray_options(p)  # --ray [ADDRESS] --cpus_per_fold --gpus_per_fold: the folds as Ray tasks instead of --jobs
    p.add_argument("--plan", action="store_true", help="print the estimated hours and disk of each stage on this "
                   "machine, measured on a sample of the clips (readaloud/pipeline/plan.py); trains nothing")
    add_plan_options(p, gpus=False)
    args, rest = p.parse_known_args()
    if args.plan:
        args.gpus = len(args.gpus.split(",")) if args.gpus else 0
        run_plan(p, args, rest + (["--epochs", str(args.epochs)] if args.epochs else []))
        return
    try:
        models = resolve_models(args.models)
    except KeyError as exc:
        p.error(exc.args[0])
    try:
        n_folds = resolve_n_folds(args.data, args.n_folds)
    except FoldFileError as exc:
        p.error(str(exc))
    folds = list(range(n_folds)) if args.folds is None else [int(f) for f in args.folds.split(",")]
    if any(not 0 <= f < n_folds for f in folds):
        p.error(f"--folds must be within 0..{n_folds - 1}")
    extra = list(rest) + (["--epochs", str(args.epochs)] if args.epochs else [])
    try:
        overrides = parse_overrides(extra)
        cfgs = [variant_config(m, overrides) for m in models]  # refuse bad overrides before starting any job
    except ConfigError as exc:
        p.error(str(exc))

    from readaloud.pipeline.launch import start_launcher
    gpus = args.gpus.split(",") if args.gpus else None
    to_train = {m for m, _ in unfinished_folds(models, folds, args.assets, args.force)}
    if to_train and args.ray is None:
        start_launcher(gpus)  # the fork server imports torch while this process does and checks the data

    from readaloud.members.registry import member_for
    from readaloud.pipeline.runner import prepare_for_jobs, run_jobs
    try:
        for cfg in cfgs:
            member_for(cfg)  # a family that is not registered
    except ConfigError as exc:
        p.error(str(exc))
    if to_train:  # a rerun with every fold finished prepares nothing (model6asr's ear copies cost minutes)
        prepare_for_jobs(args.data, args.tts_dir, n_folds, [c for m, c in zip(models, cfgs) if m in to_train])
    if args.ray is not None:
        from readaloud.ray_jobs import run_jobs_on_ray
        results = run_jobs_on_ray(models, folds, args.data, args.assets, args.tts_dir, extra, args.force, args.ray,
                                  args.cpus_per_fold, args.gpus_per_fold)
    else:
        results = run_jobs(models, folds, args.data, args.assets, args.tts_dir, args.jobs, extra, args.force, gpus)
    failed = [k for k, v in results.items() if v != 0]
    print(f"{len(results) - len(failed)}/{len(results)} folds finished" +
          (f"; failed: {', '.join(failed)} (see check_models.py)" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
