"""The shared trainer: one (variant, fold) per call, resumable, with early stopping.

Output place per variant and fold (fixed, so rerunning the same command resumes):
    assets/<variant>_<fold>.pth        best weights + everything inference needs (written last)
    assets/<variant>_<fold>_oof.csv    out-of-fold predictions on the held-out fold
    assets/<variant>_<fold>.json       resolved config, versions, git commit, scores
    assets/runs/<variant>_<fold>/      last.pth (resume state), best.pth, metrics.csv, train.log
A fold whose .pth and _oof.csv exist is finished and is skipped unless forced.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import queue
import random
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .augment import Augmenter
from .checkpoints import atomic_csv, atomic_save, atomic_write, clean_temp_files, safe_load
from .config import RunConfig
from .cpu import ThreadBudget
from .data import load_split
from .dataset import Categories, PairDataset, SpecAugment, bucket_batches, collate, to_device
from .features import FeatureParams
from .folds import load_or_create_folds
from .metrics import log_loss, logit, prior_predictions, sigmoid, task_priors
from .models import build_model, whisper_config_dict
from .prepare import ensure_clip_features, ensure_references
from .text import Vocab
from .variants import variant_config

log = logging.getLogger("readaloud.train")
CHECKPOINT_FORMAT = 1
MAX_BAD_STEPS = 5


class TrainingAborted(RuntimeError):
    pass


@dataclass
class FoldPaths:
    assets: Path
    variant: str
    fold: int

    @property
    def stem(self) -> str:
        return f"{self.variant}_{self.fold}"

    @property
    def checkpoint(self) -> Path:
        return self.assets / f"{self.stem}.pth"

    @property
    def oof(self) -> Path:
        return self.assets / f"{self.stem}_oof.csv"

    @property
    def summary(self) -> Path:
        return self.assets / f"{self.stem}.json"

    @property
    def run_dir(self) -> Path:
        return self.assets / "runs" / self.stem

    @property
    def last(self) -> Path:
        return self.run_dir / "last.pth"

    @property
    def best(self) -> Path:
        return self.run_dir / "best.pth"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.csv"

    @property
    def progress(self) -> Path:
        return self.run_dir / "progress.json"

    # the two files train.py's runner writes: kept when --force/--restart clear the run folder
    @property
    def stdout_log(self) -> Path:
        return self.run_dir / "stdout.log"

    @property
    def thread_budget(self) -> Path:
        return self.run_dir / "threads"

    def finished(self) -> bool:
        return self.checkpoint.exists() and self.oof.exists()


def retrain_command(variant: str, fold: int, n_folds: int, data: str | Path, assets: str | Path,
                    extra: str = "") -> str:
    cmd = f"python train_model{variant.removeprefix('model')}.py --fold {fold} --n_folds {n_folds}"
    if str(data) != "data":
        cmd += f" --data {data}"
    if str(assets) != "assets":
        cmd += f" --assets {assets}"
    return cmd + (f" {extra}" if extra else "")


def environment_info() -> dict:
    import transformers
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except Exception:
        commit = "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "git_commit": commit}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} asked for, but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, total: int, cfg) -> float:
    """Linear warmup, then: cosine to min_lr_ratio | inverse square root | constant (also the
    base of 'plateau', whose reductions are applied on top)."""
    warmup = max(1, int(cfg.warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule in ("constant", "plateau"):
        return 1.0
    if cfg.schedule == "inverse_sqrt":
        return math.sqrt(warmup / (step + 1))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.inference_mode()
def predict_logits(model, dataset: PairDataset, device: torch.device, batch_max_frames: int,
                   max_batch: int = 64, progress: bool = False) -> np.ndarray:
    """Logits for every item of `dataset`, in its order."""
    model.eval()
    out = np.zeros(len(dataset), dtype=np.float64)
    batches = bucket_batches(dataset.lengths, batch_max_frames, max_batch, shuffle=False)
    for idx in tqdm(batches, desc="predict", disable=not progress, leave=False):
        batch = to_device(collate([dataset.item(i) for i in idx]), device)
        with autocast(device):
            out[idx] = model(batch)["logits"].float().cpu().numpy()
    return out


def autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def _setup_logging(run_dir: Path, quiet: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("readaloud")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_readaloud", False):
            root.removeHandler(h)
    fh = logging.FileHandler(run_dir / "train.log")
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
        return json.loads(paths.summary.read_text()) if paths.summary.exists() else {"skipped": True}
    if (force or restart) and paths.run_dir.exists():
        keep = {paths.stdout_log, paths.thread_budget}  # train.py's log of this very process, its thread budget
        for p in paths.run_dir.iterdir():
            if p not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    if force:
        for p in (paths.checkpoint, paths.oof, paths.summary):
            p.unlink(missing_ok=True)
    _setup_logging(paths.run_dir, quiet)
    clean_temp_files(paths.run_dir)
    clean_temp_files(paths.assets)
    return None


def load_training_data(data_dir: str | Path, tts_dir: str | Path, cfg: RunConfig, n_folds: int, progress: bool):
    """(training metadata with its `fold` column, TTS reference bank, clip feature store, bad clips)."""
    meta = load_split(data_dir, "train").meta
    meta["fold"] = load_or_create_folds(data_dir, meta, n_folds).to_numpy()
    params = FeatureParams(n_mels=cfg.model.n_mels)
    refs = ensure_references(tts_dir, cfg.tts, meta["expected_text"].unique(), params, progress=progress)
    clips, bad = ensure_clip_features(data_dir, meta["filename"].tolist(), params, progress=progress)
    if bad:
        log.warning("%d training clips are unusable and skipped (listed in %s/cache/bad_clips.csv)",
                    len(bad), data_dir)
    return meta, refs, clips, bad


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


class BatchesAhead:
    """Yields (i, make(i)) for i in `indices`; with depth > 0 the batches are built that many
    ahead in a background thread, so a GPU does not wait for augmentation and collation. Each
    batch has its own seeded generator, so the stream is identical either way."""

    def __init__(self, make, indices, depth: int = 0):
        self.make, self.indices, self.depth = make, list(indices), depth
        self._stop = threading.Event()
        if depth > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._produce, daemon=True, name="batches-ahead")
            self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for i in self.indices:
                if self._stop.is_set() or not self._put((i, self.make(i), None)):
                    return
        except BaseException as exc:  # handed to the training loop, raised there
            self._put((None, None, exc))

    def __iter__(self):
        if self.depth <= 0:
            for i in self.indices:
                yield i, self.make(i)
            return
        try:
            for _ in self.indices:
                i, batch, exc = self._queue.get()
                if exc is not None:
                    raise exc
                yield i, batch
        finally:  # the loop ended, broke or raised: stop building
            self._stop.set()


def train_fold(variant: str, fold: int, n_folds: int = 6, data_dir: str | Path = "data",
               assets_dir: str | Path = "assets", tts_dir: str | Path = "tts_data",
               overrides: dict | None = None, force: bool = False, restart: bool = False,
               resume: str | Path | None = None, quiet: bool = False, progress: bool = True) -> dict:
    """Train `variant` on every fold but `fold`, validate on `fold`, write the fold's files."""
    cfg = variant_config(variant, overrides)
    if not 0 <= fold < n_folds:
        raise ValueError(f"--fold {fold} is not in 0..{n_folds - 1}")
    if cfg.model.arch == "gbm":  # gradient boosting on alignment features: same fold files, no network
        from .gbm import train_gbm_fold
        return train_gbm_fold(variant, fold, n_folds, data_dir, assets_dir, tts_dir, cfg, force=force,
                              restart=restart, quiet=quiet, progress=progress)
    t_start = time.time()
    paths = FoldPaths(Path(assets_dir), variant, fold)
    finished = start_fold_run(paths, force, restart, quiet)
    if finished is not None:
        return finished
    env = environment_info()
    (paths.run_dir / "config.json").write_text(cfg.to_json())
    if not quiet:
        log.info("%s fold %d/%d\nconfig: %s\nenvironment: %s", variant, fold, n_folds,
                 json.dumps(cfg.to_dict(), sort_keys=True), json.dumps(env))
    threads = ThreadBudget(cfg.threads)  # train.py may raise it when a parallel job ends
    device = pick_device(cfg.device)
    prefetch = cfg.data.prefetch if cfg.data.prefetch >= 0 else (2 if device.type == "cuda" else 0)
    seed_everything(cfg.seed * 1000 + fold)

    # ---- data --------------------------------------------------------------------------
    meta, refs, clips, bad = load_training_data(data_dir, tts_dir, cfg, n_folds, progress)
    vocab = Vocab.build(meta["expected_text"], cfg.model.ctc_unit)
    cats = Categories.from_meta(meta)
    train_meta, valid_meta = meta[meta["fold"] != fold], meta[meta["fold"] == fold]
    priors = task_priors(train_meta)
    model = build_model(cfg.model, len(cats.tasks), len(cats.grades), len(vocab))
    if cfg.model.backbone and model.ctc_head is not None:
        from .pretraining import init_heads_from_backbone
        n = init_heads_from_backbone(model, vocab, cfg.model.backbone)
        if n:
            log.info("phoneme heads: %d rows start from the backbone's pretrained heads", n)
    max_frames = model.max_frames
    train_ds = PairDataset(train_meta, clips, refs, vocab, cats, max_frames, cfg.model.pause_frames,
                         model.frames_per_position)
    valid_ds = PairDataset(valid_meta, clips, refs, vocab, cats, max_frames, cfg.model.pause_frames,
                         model.frames_per_position)
    log.info("fold %d: %d train / %d valid clips, %d phoneme tokens, %s, %.1fM parameters",
             fold, len(train_ds), len(valid_ds), len(vocab) - 1, device,
             sum(p.numel() for p in model.parameters()) / 1e6)
    model.to(device)

    # ---- optimisation ------------------------------------------------------------------
    oc = cfg.optim
    groups: dict[tuple[bool, bool], list] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:  # (new part of the model?, decayed?)
            groups.setdefault((not n.startswith("encoder."), p.ndim >= 2 and "emb" not in n), []).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": ps, "lr": oc.lr * (oc.head_lr_scale if new else 1.0),
          "weight_decay": oc.weight_decay if decay else 0.0} for (new, decay), ps in sorted(groups.items())],
        lr=oc.lr, betas=(oc.beta1, oc.beta2))
    dc = cfg.data
    augmenter = Augmenter.from_config(dc, cfg.model.n_mels, model.frames_per_position, max_frames)
    # batches are budgeted on the longest an item can become after time stretching
    train_lengths = np.ceil(train_ds.lengths * augmenter.length_factor()).astype(np.int64)
    n_batches = len(bucket_batches(train_lengths, dc.batch_max_frames, dc.max_batch_size, True, 0))
    total_updates = cfg.epochs * math.ceil(n_batches / oc.update_freq)
    if cfg.max_updates:
        total_updates = min(total_updates, cfg.max_updates)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    spec_aug = SpecAugment(dc.spec_time_masks, dc.spec_time_width, dc.spec_freq_masks, dc.spec_freq_width)

    state = {"epoch": 0, "batch": 0, "step": 0, "evals": 0, "best": float("inf"), "best_epoch": -1,
             "best_step": -1, "bad_evals": 0, "plateau_scale": 1.0, "stopped": ""}
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_updates, oc) * state["plateau_scale"])
    resume_path = Path(resume) if resume else paths.last
    resumed = resume_path.exists() and not restart
    if resumed:
        ck = safe_load(resume_path, fix=f"delete {resume_path} or pass --restart")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        state.update(ck["state"])
        torch.set_rng_state(ck["rng_torch"])
        if torch.cuda.is_available() and "rng_cuda" in ck:
            torch.cuda.set_rng_state_all(ck["rng_cuda"])
        log.info("resumed from %s at epoch %d (batch %d, step %d, best valid log loss %.4f)",
                 resume_path, state["epoch"], state["batch"], state["step"], state["best"])
    history = pd.read_csv(paths.metrics).to_dict("records") if resumed and paths.metrics.exists() else []
    history = [r for r in history if r["step"] <= state["step"]]
    trackers = Trackers(cfg, paths, resumed_step=state["step"] if resumed else None)

    # ---- loop: batches -> updates; evaluation at each epoch end and every eval_every updates ----
    bad_steps = 0
    sums = _fresh_sums()
    t_eval = time.time()

    def evaluate(epoch_done: bool) -> None:
        nonlocal sums, t_eval
        valid_logits = predict_logits(model, valid_ds, device, dc.batch_max_frames, dc.max_batch_size)
        valid_loss = log_loss(valid_ds.labels, sigmoid(valid_logits)) if len(valid_ds) else float("nan")
        n = max(1, sums["n"])
        row = {"epoch": state["epoch"] + (0 if epoch_done else 1), "step": state["step"],
               "train_loss": sums["loss"] / n, "train_bce": sums["bce"] / n, "train_ctc": sums["ctc"] / n,
               "train_bag": sums["bag"] / n, "valid_logloss": valid_loss, "lr": optimizer.param_groups[0]["lr"],
               "grad_norm": sums["grad_norm"] / max(1, sums["updates"]), "seconds": time.time() - t_eval}
        history.append(row)
        state["evals"] += 1
        improved = valid_loss < state["best"] - 1e-5
        if improved:
            state.update(best=valid_loss, best_epoch=row["epoch"], best_step=state["step"], bad_evals=0)
            atomic_save({"model": model.state_dict()}, paths.best)
        else:
            state["bad_evals"] += 1
            if oc.schedule == "plateau" and state["bad_evals"] % oc.plateau_patience == 0:
                state["plateau_scale"] *= oc.plateau_factor
                log.info("valid log loss did not improve: learning rate x%.2f", oc.plateau_factor)
        _write_metrics(paths, history)
        trackers.log(row, state["step"])
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "state": dict(state),
                     "rng_torch": torch.get_rng_state(),
                     **({"rng_cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})},
                    paths.last)
        _write_progress(paths, state, cfg.epochs, row)
        log.info("%s epoch %d/%d step %d  train loss %.4f (bce %.4f ctc %.3f bag %.3f)  valid log loss %.4f%s  %.0fs",
                 paths.stem, row["epoch"], cfg.epochs, state["step"], row["train_loss"], row["train_bce"],
                 row["train_ctc"], row["train_bag"], valid_loss, "  *best*" if improved else "", row["seconds"])
        if os.environ.get("READALOUD_FAULT_DIE_AFTER_EVAL") == str(state["evals"]):
            os._exit(137)  # fault injection for the resume test: die like a killed process
        sums, t_eval = _fresh_sums(), time.time()
        model.train()

    while not state["stopped"] and state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        model.train()
        order_seed = int(np.random.default_rng([cfg.seed, fold, epoch]).integers(2**31))
        batches = bucket_batches(train_lengths, dc.batch_max_frames, dc.max_batch_size, True, seed=order_seed)
        bar = tqdm(total=len(batches), initial=state["batch"], desc=f"{paths.stem} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress, leave=False, unit="batch")
        optimizer.zero_grad(set_to_none=True)

        def make_batch(bi: int, epoch: int = epoch, batches: list = batches) -> dict:
            idx = batches[bi]
            rng = np.random.default_rng([cfg.seed, fold, epoch, bi])  # per batch: resumable anywhere
            batch = collate([augmenter(train_ds.item(i), rng) for i in idx],
                            spec_aug if dc.spec_time_masks or dc.spec_freq_masks else None, rng)
            if dc.task_dropout > 0:
                drop = torch.from_numpy(rng.random(len(idx)) < dc.task_dropout)
                batch["task"] = batch["task"].masked_fill(drop, 0)
                batch["grade"] = batch["grade"].masked_fill(drop, 0)
            batch["ctc_response"] = batch["label"] > 0.5
            return batch

        for bi, batch in BatchesAhead(make_batch, range(state["batch"], len(batches)), prefetch):
            idx = batches[bi]
            threads.poll()
            batch = to_device(batch, device)
            with autocast(device):
                out = model(batch)
                target = batch["label"] * (1 - oc.label_smoothing) + 0.5 * oc.label_smoothing
                bce = F.binary_cross_entropy_with_logits(out["logits"].float(), target)
                if hasattr(model, "auxiliary_loss"):  # a model's own auxiliary loss (encdec: token CE + CTC)
                    ctc = model.auxiliary_loss(out, batch) if cfg.model.ctc_weight > 0 \
                        else torch.zeros((), device=device)
                else:
                    ctc = model.ctc_loss(out, batch) if cfg.model.ctc_weight > 0 and "ctc_log_probs" in out \
                        else torch.zeros((), device=device)
                bag = model.bag_loss(out, batch) if "bag_logits" in out else torch.zeros((), device=device)
                loss = bce + cfg.model.ctc_weight * ctc + cfg.model.bag_weight * bag
            if os.environ.get("READALOUD_FAULT_NAN_FROM_STEP", "") not in ("",) and \
                    state["step"] >= int(os.environ["READALOUD_FAULT_NAN_FROM_STEP"]):
                loss = loss * float("nan")  # fault injection: a diverged model
            state["batch"] = bi + 1
            bar.update(1)
            if not torch.isfinite(loss):
                bad_steps += 1
                optimizer.zero_grad(set_to_none=True)
                log.warning("non-finite loss at epoch %d batch %d (%d in a row): update skipped",
                            epoch + 1, bi, bad_steps)
                if bad_steps >= MAX_BAD_STEPS:
                    atomic_write(paths.run_dir / "aborted.json", json.dumps(
                        {"reason": "non-finite loss", "epoch": epoch + 1, "step": state["step"],
                         "seed": cfg.seed, "time": time.time()}, indent=1))
                    raise TrainingAborted(
                        f"{paths.stem}: {bad_steps} non-finite losses in a row; stopped, keeping the last "
                        f"good checkpoint {paths.last}. Retry with another seed or a lower --lr: "
                        f"{retrain_command(variant, fold, n_folds, data_dir, assets_dir, '--seed 7 --restart')}")
                continue
            scaler.scale(loss / oc.update_freq).backward()
            k = len(idx)
            sums["loss"] += float(loss.detach()) * k
            sums["bce"] += float(bce.detach()) * k
            sums["ctc"] += float(ctc.detach()) * k
            sums["bag"] += float(bag.detach()) * k
            sums["n"] += k
            bar.set_postfix(bce=f"{sums['bce'] / sums['n']:.3f}", ctc=f"{sums['ctc'] / sums['n']:.2f}")
            if (bi + 1) % oc.update_freq and bi + 1 != len(batches):
                continue
            scaler.unscale_(optimizer)
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip)
            if torch.isfinite(gn):
                scaler.step(optimizer)
                bad_steps = 0
                sums["grad_norm"] += float(gn)
                sums["updates"] += 1
            else:
                bad_steps += 1
                log.warning("non-finite gradient at epoch %d batch %d: update skipped", epoch + 1, bi)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            if cfg.max_updates and state["step"] >= cfg.max_updates:
                state["stopped"] = f"reached --max_updates {cfg.max_updates}"
                break
            if cfg.eval_every and state["step"] % cfg.eval_every == 0 and bi + 1 < len(batches):
                evaluate(epoch_done=False)
                if state["bad_evals"] >= cfg.patience:
                    state["stopped"] = f"early stop: {cfg.patience} evaluations without improvement"
                    break
        bar.close()
        epoch_done = state["batch"] >= len(batches)
        if epoch_done:
            state["epoch"], state["batch"] = epoch + 1, 0
        if not (history and history[-1]["step"] == state["step"]):  # not evaluated at this step yet
            evaluate(epoch_done=epoch_done)
        if state["bad_evals"] >= cfg.patience and not state["stopped"]:
            state["stopped"] = f"early stop: {cfg.patience} evaluations without improvement"
    if state["stopped"]:
        log.info("%s: %s (best: epoch %s, step %d)", paths.stem, state["stopped"], state["best_epoch"], state["best_step"])
    trackers.close()

    # ---- finish: best weights -> OOF predictions -> the fold's files ---------------------
    if paths.best.exists():
        model.load_state_dict(safe_load(paths.best, map_location=device)["model"])
    valid_logits = predict_logits(model, valid_ds, device, dc.batch_max_frames, dc.max_batch_size)
    oof = out_of_fold_table(valid_meta, fold, priors, dict(zip(valid_ds.meta["filename"], valid_logits)))
    fold_loss = log_loss(oof["score"], oof["pred"])
    atomic_csv(oof, paths.oof)
    summary = {"variant": variant, "fold": fold, "n_folds": n_folds, "valid_logloss": fold_loss,
               "valid_logloss_prior": log_loss(oof["score"], prior_predictions(priors, oof["task"])),
               "best_epoch": state["best_epoch"], "best_step": state["best_step"], "epochs_run": state["epoch"],
               "updates": state["step"], "stopped": state["stopped"], "n_train": len(train_ds),
               "n_valid": len(valid_meta), "skipped_clips": sorted(bad),
               "seconds": time.time() - t_start,  # this run of the command (a resumed fold: since the resume)
               "config": cfg.to_dict(), "environment": env, "data": str(data_dir)}
    atomic_save({"format": CHECKPOINT_FORMAT, "variant": variant, "fold": fold, "n_folds": n_folds,
                 "config": json.dumps(cfg.to_dict()), "whisper_config": json.dumps(whisper_config_dict(model)),
                 "vocab": json.dumps(vocab.to_dict()), "tasks": cats.tasks, "grades": cats.grades,
                 "priors": json.dumps(priors), "valid_logloss": fold_loss,
                 "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, paths.checkpoint)
    atomic_write(paths.summary, json.dumps(summary, indent=1))
    try:
        from .plots import plot_confusion_by_task, plot_training_curves
        plot_training_curves(paths.metrics, paths.run_dir / "curves.png", title=paths.stem)
        plot_confusion_by_task(oof, paths.run_dir / "confusion.png", title=f"{paths.stem} out-of-fold")
    except Exception as exc:  # a plot must never cost a trained fold
        log.warning("could not plot curves: %s", exc)
    log.info("%s: finished, valid log loss %.4f (task prior %.4f) -> %s", paths.stem, fold_loss,
             summary["valid_logloss_prior"], paths.checkpoint)
    return summary


def _write_metrics(paths: FoldPaths, history: list[dict]) -> None:
    atomic_csv(pd.DataFrame(history), paths.metrics)


def _write_progress(paths: FoldPaths, state: dict, epochs: int, row: dict) -> None:
    atomic_write(paths.progress, json.dumps({"epoch": state["epoch"], "epochs": epochs, "best": state["best"],
                                             "valid_logloss": row["valid_logloss"], "time": time.time()}))


def _fresh_sums() -> dict:
    return {"loss": 0.0, "bce": 0.0, "ctc": 0.0, "bag": 0.0, "n": 0, "grad_norm": 0.0, "updates": 0}


class Trackers:
    """TensorBoard (on by default) and Weights & Biases (--wandb; offline without an account)."""

    def __init__(self, cfg: RunConfig, paths: FoldPaths, resumed_step: int | None):
        self.tb = self.wandb = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(paths.run_dir / "tensorboard"), purge_step=resumed_step)
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("--wandb needs the wandb package: pip install wandb") from None
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb.init(project=cfg.wandb_project, name=paths.stem, id=paths.stem.replace("_", "-"),
                                    dir=str(paths.run_dir), config=cfg.to_dict(), mode=mode, resume="allow",
                                    reinit=True)

    def log(self, row: dict, step: int) -> None:
        scalars = {k: v for k, v in row.items() if k not in ("epoch", "step") and v == v}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k.replace("_", "/", 1), v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({**scalars, "epoch": row["epoch"]}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
