"""One (variant, fold) of any member family: `run_fold`, and the command line of train_model<v>.py.

run_fold owns what every family shares: skipping a finished fold, clearing what --force and
--restart discard, the fold's log, the data (training metadata, folds read from the fold
file, references, clip features, unusable clips), then the family's `fit`, then the OOF
table (a clip the family could not predict gets its task prior, flagged), the summary, the
checkpoint (written atomically, last) and the plots. The files are those of layout.FoldPaths;
a fold whose checkpoint and OOF file exist is finished and is skipped unless forced.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..checkpoints import atomic_csv, atomic_save, atomic_write, clean_temp_files
from ..cli import add_common, parse_overrides
from ..config import ConfigError, RunConfig, apply_overrides, load_saved_config
from ..data import load_split
from ..features import FeatureParams
from ..layout import FoldPaths
from ..members.base import FitContext, FitResult, FoldData, Member
from ..members.registry import member_for
from ..metrics import log_loss, logit, prior_predictions, sigmoid, task_priors
from ..plots import plot_confusion_by_task, plot_training_curves
from ..prep.dataset import Categories
from ..prep.folds import FoldFileError, load_or_create_folds, resolve_n_folds
from ..prep.prepare import ensure_clip_features, ensure_references
from ..variants import VARIANTS, variant_config
from .trainer import TrainingAborted, train_network

log = logging.getLogger("readaloud.train")
CHECKPOINT_FORMAT = 1


def environment_info() -> dict:
    import transformers
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except Exception:
        commit = "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "git_commit": commit,
            # the kernels torch picks for this processor and the thread count change a run's bits:
            # a figure from another machine or thread count is recognisable as such
            "cpu": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads()}


def _setup_logging(log_file: Path, quiet: bool) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("readaloud")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_readaloud", False):
            root.removeHandler(h)
    fh = logging.FileHandler(log_file)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(logging.Formatter("%(message)s"))
    sh.setLevel(logging.WARNING if quiet else logging.INFO)
    for h in (fh, sh):
        h._readaloud = True
        root.addHandler(h)


def start_fold_run(paths: FoldPaths, force: bool, restart: bool, quiet: bool) -> dict | None:
    """A finished fold's summary (it is skipped), or None after clearing what --force and
    --restart discard, setting up the fold's log and removing leftover temporary files."""
    if paths.finished() and not force:
        print(f"{paths.stem}: already trained ({paths.checkpoint}); use --force to retrain")
        return paths.read_summary() or {"skipped": True}
    if (force or restart) and paths.run_dir.exists():
        keep = {paths.stdout_log, paths.requested_config}  # the runner's log of this very process, its config
        for p in paths.run_dir.iterdir():
            if p not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    if force:
        for p in (paths.checkpoint, paths.oof, paths.summary):
            p.unlink(missing_ok=True)
    _setup_logging(paths.log, quiet)
    clean_temp_files(paths.run_dir)
    clean_temp_files(paths.assets)
    return None


def load_fold_data(variant: str, fold: int, cfg: RunConfig, data_dir: str | Path, tts_dir: str | Path,
                   n_folds: int, progress: bool) -> FoldData:
    """The training clips with their folds (the fold file's; made with `n_folds` if there is
    none yet), the fold's references and clip features, and the clips that cannot be used."""
    meta = load_split(data_dir, "train").meta
    meta["fold"] = load_or_create_folds(data_dir, meta, n_folds).to_numpy()
    params = FeatureParams(n_mels=cfg.model.n_mels)
    refs = ensure_references(tts_dir, cfg.tts, meta["expected_text"].unique(), params, progress=progress)
    clips, bad = ensure_clip_features(data_dir, meta["filename"].tolist(), params, progress=progress)
    if bad:
        log.warning("%d training clips are unusable and skipped (listed in %s/cache/bad_clips.csv)",
                    len(bad), data_dir)
    priors = task_priors(meta[meta["fold"] != fold])
    return FoldData(variant, fold, n_folds, cfg, Path(data_dir), Path(tts_dir), meta, refs, clips, bad,
                    Categories.from_meta(meta), priors, progress)


def out_of_fold_table(valid_meta: pd.DataFrame, fold: int, priors: dict, logits: dict) -> pd.DataFrame:
    """The fold's OOF rows; a clip with no prediction in `logits` ({filename: logit}) gets its
    task's prior and fallback = 1."""
    oof = valid_meta[["filename", "task", "grade", "score"]].copy()
    oof.insert(1, "fold", fold)
    fallback = logit(prior_predictions(priors, oof["task"]))
    oof["logit"] = [logits.get(f, fb) for f, fb in zip(oof["filename"], fallback)]
    oof["fallback"] = (~oof["filename"].isin(logits)).astype(int)
    oof["pred"] = sigmoid(oof["logit"].to_numpy())
    return oof


def run_fold(variant: str, fold: int, data_dir: str | Path = "data", assets_dir: str | Path = "assets",
             tts_dir: str | Path = "tts_data", overrides: dict | None = None, base: RunConfig | None = None, *,
             n_folds: int | None = None, force: bool = False, restart: bool = False,
             resume: str | Path | None = None, quiet: bool = False, progress: bool = True) -> dict:
    """Train `variant` on every fold but `fold`, validate on `fold`, write the fold's files.

    The config is the variant's (or `base`, a saved config) with `overrides`; the fold count is
    the fold file's (`n_folds`, when given, must agree with it). Returns the fold's summary."""
    t_start = time.time()
    cfg = apply_overrides(base, overrides or {}) if base is not None else variant_config(variant, overrides)
    member = member_for(cfg)
    n_folds = resolve_n_folds(data_dir, n_folds)
    if not 0 <= fold < n_folds:
        raise FoldFileError(f"--fold {fold} is not in 0..{n_folds - 1} (the fold file of {data_dir} has {n_folds})")
    paths = FoldPaths(Path(assets_dir), variant, fold)
    finished = start_fold_run(paths, force, restart, quiet)
    if finished is not None:
        return finished
    member.check_options(cfg)
    env = environment_info() | member.environment()
    atomic_write(paths.config, cfg.to_json())
    data = load_fold_data(variant, fold, cfg, data_dir, tts_dir, n_folds, progress)
    if not quiet:
        log.info("%s fold %d/%d (%s)\nconfig: %s\nenvironment: %s", variant, fold, data.n_folds, member.family,
                 json.dumps(cfg.to_dict(), sort_keys=True), json.dumps(env))
    ctx = FitContext(paths, restart=restart, resume=Path(resume) if resume else None, quiet=quiet,
                     progress=progress, train_network=train_network)
    result = member.fit(data, ctx)
    return write_fold(member, data, paths, result, env, t_start)


def write_fold(member: Member, data: FoldData, paths: FoldPaths, result: FitResult, env: dict,
               t_start: float) -> dict:
    """The fold's OOF table, summary and checkpoint (last: its existence means finished), and plots."""
    oof = out_of_fold_table(data.valid_meta, data.fold, data.priors, result.valid_logits)
    fold_loss = log_loss(oof["score"], oof["pred"])
    atomic_csv(oof, paths.oof)
    cfg = data.cfg
    summary = {"variant": data.variant, "fold": data.fold, "n_folds": data.n_folds, "arch": member.family,
               "valid_logloss": fold_loss,
               "valid_logloss_prior": log_loss(oof["score"], prior_predictions(data.priors, oof["task"])),
               **result.summary, "n_valid": len(oof), "skipped_clips": sorted(data.bad),
               "seconds": time.time() - t_start,  # this run of the command (a resumed fold: since the resume)
               "config": cfg.to_dict(), "environment": env, "data": str(data.data_dir)}
    atomic_save({"format": CHECKPOINT_FORMAT, "arch": member.family, "variant": data.variant, "fold": data.fold,
                 "n_folds": data.n_folds, "config": json.dumps(cfg.to_dict()), "tasks": data.cats.tasks,
                 "grades": data.cats.grades, "priors": json.dumps(data.priors), "valid_logloss": fold_loss,
                 **result.payload}, paths.checkpoint)
    atomic_write(paths.summary, json.dumps(summary, indent=1))
    try:
        if result.curves:
            plot_training_curves(paths.metrics, paths.run_dir / "curves.png", title=paths.stem)
        plot_confusion_by_task(oof, paths.run_dir / "confusion.png", title=f"{paths.stem} out-of-fold")
    except Exception as exc:  # a plot must never cost a trained fold
        log.warning("could not plot: %s", exc)
    log.info("%s: finished, valid log loss %.4f (task prior %.4f) in %.0fs -> %s", paths.stem, fold_loss,
             summary["valid_logloss_prior"], summary["seconds"], paths.checkpoint)
    drop_resume_state(paths)
    return summary


def drop_resume_state(paths: FoldPaths) -> None:
    """Remove a finished fold's resume state: nothing reads it again, and for a fine-tuned Whisper
    decoder it is several times the size of the fold's checkpoint (optimizer moments + a copy of the
    best weights; docs/members.md)."""
    freed = 0
    for p in paths.resume_state:
        if p.exists():
            freed += p.stat().st_size
            p.unlink()
    if freed:
        log.info("%s: removed its resume state (%.0f MB)", paths.stem, freed / 1e6)


def train_variant_main(variant: str, argv: list[str] | None = None) -> None:
    """Entry point of train_model<variant>.py: train one fold of one registered variant."""
    p = argparse.ArgumentParser(
        description=f"Train variant {variant} ({VARIANTS[variant]['description']}) on one fold. "
                    "Any config key can be overridden: --lr 2e-5, --optim.weight_decay 0.01, --epochs 3 "
                    "(see readaloud/config.py for all keys).",
        allow_abbrev=False)  # a config key is never read as the prefix of an option: --tts is not --tts_dir
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--n_folds", type=int, default=None,
                   help="checked against the data set's fold file (made by preprocess.py; made with this "
                        "count if there is none yet)")
    add_common(p)
    p.add_argument("--config", default=None,
                   help="start from this saved config (a fold's runs/<stem>/config.json) instead of the variant's")
    p.add_argument("--force", action="store_true", help="retrain even if this fold is finished")
    p.add_argument("--restart", action="store_true", help="ignore the fold's last checkpoint and start over")
    p.add_argument("--resume", default=None, help="resume from this checkpoint instead of the fold's last one")
    p.add_argument("--quiet", action="store_true", help="hide the config/environment printout and per-epoch logs")
    p.add_argument("--no_progress", action="store_true", help="no progress bars (e.g. when run by train.py)")
    args, rest = p.parse_known_args(argv)
    try:
        overrides = parse_overrides(rest)
        base = load_saved_config(args.config) if args.config else None
        run_fold(variant, args.fold, args.data, args.assets, args.tts_dir, overrides, base, n_folds=args.n_folds,
                 force=args.force, restart=args.restart, resume=args.resume, quiet=args.quiet,
                 progress=not args.no_progress)
    except (ConfigError, FoldFileError) as exc:
        p.error(str(exc))
    except TrainingAborted as exc:
        logging.getLogger("readaloud").error(str(exc))
        sys.exit(3)
