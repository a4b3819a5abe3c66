"""The neural loop every network family shares: build, loop, evaluate; resumable anywhere.

`train_network(member, data, ctx)` is what run_fold offers neural families (FitContext.
train_network). `NetworkTrainer.build` sets up the network (the member builds it), data,
optimiser and schedule; `resume` restores a killed run's state; `run` loops over batches
with evaluations at each epoch end and every --eval_every updates (`evaluate`); `finish`
keeps the best evaluation's weights (--select best, early stopping on the held-out fold), or the
last epoch's or the mean of the last epochs' (--select last, --average_last: the held-out fold
chooses nothing), and predicts the held-out fold. The network computes its own loss
(`model.loss(outputs, batch) -> (loss, parts)`), so nothing here depends on the family.

Batches draw their randomness from (seed, fold, epoch, batch), and `last.pth` holds the model,
optimiser, scheduler, grad scaler, loop state and RNG state at every evaluation, so a killed
and resumed fold ends with the same weights as an uninterrupted one.

Tests inject faults through `HOOKS` (tests/fault_injection.py), not the environment.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..checkpoints import atomic_csv, atomic_save, atomic_write, safe_load
from ..layout import retrain_command
from ..metrics import log_loss, sigmoid
from ..prep.augment import Augmenter
from ..prep.dataset import SpecAugment, bucket_batches, to_device
from ..members.base import FitContext, FitResult, FoldData
from ..members.pair.neural import NeuralMember, autocast, pick_device, predict_logits
from .batches import BatchesAhead
from .tracking import Trackers

log = logging.getLogger("readaloud.train")
MAX_BAD_STEPS = 5


class TrainingAborted(RuntimeError):
    pass


@dataclass
class LoopHooks:
    """Callbacks a test installs to inject faults; empty in normal runs."""
    after_evaluation: list[Callable[[dict], None]] = field(default_factory=list)       # (loop state)
    loss: list[Callable[[torch.Tensor, dict], torch.Tensor]] = field(default_factory=list)  # may replace a loss


HOOKS = LoopHooks()


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


def train_network(member: NeuralMember, data: FoldData, ctx: FitContext) -> FitResult:
    """Train the member's network on the fold's training folds; early-stopped on the held-out one."""
    trainer = NetworkTrainer(member, data, ctx)
    trainer.build()
    trainer.resume()
    trainer.run()
    return trainer.finish()


def _fresh_sums(parts) -> dict:
    return {"loss": 0.0, **{p: 0.0 for p in parts}, "n": 0, "grad_norm": 0.0, "updates": 0}


class NetworkTrainer:
    def __init__(self, member: NeuralMember, data: FoldData, ctx: FitContext):
        self.member, self.data, self.ctx, self.cfg, self.paths = member, data, ctx, data.cfg, ctx.paths

    # ---- build ---------------------------------------------------------------------------------
    def build(self) -> None:
        cfg, data = self.cfg, self.data
        if cfg.threads > 0:  # fixed for the whole run: the numbers must not depend on timing
            torch.set_num_threads(cfg.threads)
        self.device = device = pick_device(cfg.device)
        self.prefetch = cfg.data.prefetch if cfg.data.prefetch >= 0 else (2 if device.type == "cuda" else 0)
        seed_everything(data.seed)
        model, self.vocab = self.member.build(data)
        self.model = model
        rows = self.member.training_rows(data)
        self.train_ds = self.member.dataset(rows, data, model, self.vocab)
        self.valid_ds = self.member.dataset(data.valid_meta, data, model, self.vocab)
        if cfg.data.text_negatives > 0:
            log.info("fold %d: %d training rows with changed texts (--text_negatives %d)", data.fold,
                     len(rows) - len(data.train_meta), cfg.data.text_negatives)
        log.info("fold %d: %d train / %d valid clips, %d phoneme tokens, %s, %.1fM parameters",
                 data.fold, len(self.train_ds), len(self.valid_ds), len(self.vocab) - 1, device,
                 sum(p.numel() for p in model.parameters()) / 1e6)
        model.to(device)
        oc, dc = cfg.optim, cfg.data
        groups: dict[tuple[bool, bool], list] = {}
        for n, p in model.named_parameters():
            if p.requires_grad:  # (new part of the model?, decayed?)
                groups.setdefault((not n.startswith(model.pretrained_prefixes), p.ndim >= 2 and "emb" not in n),
                                  []).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": ps, "lr": oc.lr * (oc.head_lr_scale if new else 1.0),
              "weight_decay": oc.weight_decay if decay else 0.0} for (new, decay), ps in sorted(groups.items())],
            lr=oc.lr, betas=(oc.beta1, oc.beta2))
        self.augmenter = Augmenter.from_config(dc, cfg.model.n_mels, model.frames_per_position, model.max_frames)
        # batches are budgeted on the longest an item can become after time stretching
        self.train_lengths = np.ceil(self.train_ds.lengths * self.augmenter.length_factor()).astype(np.int64)
        n_batches = len(bucket_batches(self.train_lengths, dc.batch_max_frames, dc.max_batch_size, True, 0))
        total_updates = cfg.epochs * math.ceil(n_batches / oc.update_freq)
        if cfg.max_updates:
            total_updates = min(total_updates, cfg.max_updates)
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
        self.spec_aug = SpecAugment(dc.spec_time_masks, dc.spec_time_width, dc.spec_freq_masks, dc.spec_freq_width) \
            if dc.spec_time_masks or dc.spec_freq_masks else None
        self.state = {"epoch": 0, "batch": 0, "step": 0, "evals": 0, "best": float("inf"), "best_epoch": -1,
                      "best_step": -1, "bad_evals": 0, "plateau_scale": 1.0, "stopped": "", "averaged": 0}
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_updates, oc) * self.state["plateau_scale"])
        self.parts = model.loss_parts
        self.sums = _fresh_sums(self.parts)
        self.bad_steps = 0
        self.average: dict[str, torch.Tensor] = {}   # --average_last: sum of the averaged epochs' weights

    def resume(self) -> None:
        """Continue from the fold's last checkpoint (or --resume PATH) unless --restart."""
        ctx, paths, state = self.ctx, self.paths, self.state
        resume_path = ctx.resume or paths.last
        resumed = resume_path.exists() and not ctx.restart
        if resumed:
            ck = safe_load(resume_path, fix=f"delete {resume_path} or pass --restart")
            self.model.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
            self.scaler.load_state_dict(ck["scaler"])
            self.average = ck.get("average", {})
            state.update(ck["state"])
            torch.set_rng_state(ck["rng_torch"])
            if torch.cuda.is_available() and "rng_cuda" in ck:
                torch.cuda.set_rng_state_all(ck["rng_cuda"])
            log.info("resumed from %s at epoch %d (batch %d, step %d, best valid log loss %.4f)",
                     resume_path, state["epoch"], state["batch"], state["step"], state["best"])
        history = pd.read_csv(paths.metrics).to_dict("records") if resumed and paths.metrics.exists() else []
        self.history = [r for r in history if r["step"] <= state["step"]]
        self.trackers = Trackers(self.cfg, paths, resumed_step=state["step"] if resumed else None)

    # ---- loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        """Epochs of batches -> updates, until the epochs are done, --max_updates or early stopping."""
        cfg, state = self.cfg, self.state
        self.t_eval = time.time()
        end = min(cfg.stop_epoch or cfg.epochs, cfg.epochs)
        while not state["stopped"] and state["epoch"] < end:
            epoch = state["epoch"]
            order_seed = int(np.random.default_rng([cfg.seed, self.data.fold, epoch]).integers(2**31))
            batches = bucket_batches(self.train_lengths, cfg.data.batch_max_frames, cfg.data.max_batch_size, True,
                                     seed=order_seed)
            self.run_epoch(epoch, batches)
            epoch_done = state["batch"] >= len(batches)
            if epoch_done:
                state["epoch"], state["batch"] = epoch + 1, 0
                if cfg.average_last > 1 and state["epoch"] > end - cfg.average_last:
                    self.add_to_average()
            if not (self.history and self.history[-1]["step"] == state["step"]):  # not evaluated at this step yet
                self.evaluate(epoch_done=epoch_done)
            if state["bad_evals"] >= cfg.patience and not state["stopped"]:
                state["stopped"] = f"early stop: {cfg.patience} evaluations without improvement"
        if not state["stopped"] and state["epoch"] < cfg.epochs:
            state["stopped"] = f"stopped after epoch {end} of the {cfg.epochs}-epoch schedule (--stop_epoch)"
        if state["stopped"]:
            log.info("%s: %s (best: epoch %s, step %d)", self.paths.stem, state["stopped"], state["best_epoch"],
                     state["best_step"])
        self.trackers.close()

    def make_batch(self, epoch: int, batches: list, bi: int) -> dict:
        """Training batch `bi` of the epoch, augmented with its own generator: resumable anywhere."""
        cfg, dc, idx = self.cfg, self.cfg.data, batches[bi]
        rng = np.random.default_rng([cfg.seed, self.data.fold, epoch, bi])
        batch = self.train_ds.collate([self.augmenter(self.train_ds.item(i), rng) for i in idx], self.spec_aug, rng)
        if dc.task_dropout > 0:
            drop = torch.from_numpy(rng.random(len(idx)) < dc.task_dropout)
            batch["task"] = batch["task"].masked_fill(drop, 0)
            batch["grade"] = batch["grade"].masked_fill(drop, 0)
        batch["ctc_response"] = batch["label"] > 0.5
        return batch

    def run_epoch(self, epoch: int, batches: list) -> None:
        cfg, state, paths = self.cfg, self.state, self.paths
        self.model.train()
        bar = tqdm(total=len(batches), initial=state["batch"], desc=f"{paths.stem} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not self.ctx.progress, leave=False, unit="batch")
        self.optimizer.zero_grad(set_to_none=True)
        stream = BatchesAhead(lambda bi: self.make_batch(epoch, batches, bi), range(state["batch"], len(batches)),
                              self.prefetch)
        for bi, batch in stream:
            bar.update(1)
            if not self.step(epoch, bi, len(batches[bi]), batch, last=bi + 1 == len(batches)):
                continue
            if cfg.max_updates and state["step"] >= cfg.max_updates:
                state["stopped"] = f"reached --max_updates {cfg.max_updates}"
                break
            if cfg.eval_every and state["step"] % cfg.eval_every == 0 and bi + 1 < len(batches):
                self.evaluate(epoch_done=False)
                if state["bad_evals"] >= cfg.patience:
                    state["stopped"] = f"early stop: {cfg.patience} evaluations without improvement"
                    break
            bar.set_postfix({p: f"{self.sums[p] / max(1, self.sums['n']):.3f}" for p in self.parts[:2]})
        bar.close()

    def step(self, epoch: int, bi: int, k: int, batch: dict, last: bool) -> bool:
        """Forward and backward of one batch; True when it completed an optimiser update."""
        oc, state, sums = self.cfg.optim, self.state, self.sums
        batch = to_device(batch, self.device)
        with autocast(self.device):
            out = self.model(batch)
            batch["target"] = batch["label"] * (1 - oc.label_smoothing) + 0.5 * oc.label_smoothing
            loss, parts = self.model.loss(out, batch)
        for hook in HOOKS.loss:
            loss = hook(loss, state)
        state["batch"] = bi + 1
        if not torch.isfinite(loss):
            self.non_finite_loss(epoch, bi)
            return False
        self.scaler.scale(loss / oc.update_freq).backward()
        sums["loss"] += float(loss.detach()) * k
        for name, value in parts.items():
            sums[name] += float(value.detach()) * k
        sums["n"] += k
        if (bi + 1) % oc.update_freq and not last:
            return False
        self.scaler.unscale_(self.optimizer)
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), oc.grad_clip)
        if torch.isfinite(gn):
            self.scaler.step(self.optimizer)
            self.bad_steps = 0
            sums["grad_norm"] += float(gn)
            sums["updates"] += 1
        else:
            self.bad_steps += 1
            log.warning("non-finite gradient at epoch %d batch %d: update skipped", epoch + 1, bi)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        return True

    def non_finite_loss(self, epoch: int, bi: int) -> None:
        """Skip the update; MAX_BAD_STEPS in a row abort the fold, keeping the last good checkpoint."""
        self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        log.warning("non-finite loss at epoch %d batch %d (%d in a row): update skipped", epoch + 1, bi, self.bad_steps)
        if self.bad_steps < MAX_BAD_STEPS:
            return
        data, paths = self.data, self.paths
        atomic_write(paths.aborted, json.dumps(
            {"reason": "non-finite loss", "epoch": epoch + 1, "step": self.state["step"], "seed": self.cfg.seed,
             "time": time.time()}, indent=1))
        raise TrainingAborted(
            f"{paths.stem}: {self.bad_steps} non-finite losses in a row; stopped, keeping the last good checkpoint "
            f"{paths.last}. Retry with another seed or a lower --lr: "
            f"{retrain_command(data.variant, data.fold, data.n_folds, data.data_dir, paths.assets, '--seed 7 --restart')}")

    # ---- evaluate ------------------------------------------------------------------------------
    def evaluate(self, epoch_done: bool) -> None:
        """Validation log loss; the best weights so far, metrics, progress and the resume state saved."""
        cfg, oc, state, paths, sums = self.cfg, self.cfg.optim, self.state, self.paths, self.sums
        valid_logits = predict_logits(self.model, self.valid_ds, self.device, cfg.data.batch_max_frames,
                                      cfg.data.max_batch_size)
        valid_loss = log_loss(self.valid_ds.labels, sigmoid(valid_logits)) if len(self.valid_ds) else float("nan")
        n = max(1, sums["n"])
        row = {"epoch": state["epoch"] + (0 if epoch_done else 1), "step": state["step"],
               "train_loss": sums["loss"] / n, **{f"train_{p}": sums[p] / n for p in self.parts},
               "valid_logloss": valid_loss, "lr": self.optimizer.param_groups[0]["lr"],
               "grad_norm": sums["grad_norm"] / max(1, sums["updates"]), "seconds": time.time() - self.t_eval}
        self.history.append(row)
        state["evals"] += 1
        improved = valid_loss < state["best"] - 1e-5
        if improved:
            state.update(best=valid_loss, best_epoch=row["epoch"], best_step=state["step"], bad_evals=0)
            if cfg.select == "best":
                atomic_save({"model": self.model.state_dict()}, paths.best)
        elif cfg.select == "best":  # with select=last the held-out clips stop nothing and slow nothing
            state["bad_evals"] += 1
            if oc.schedule == "plateau" and state["bad_evals"] % oc.plateau_patience == 0:
                state["plateau_scale"] *= oc.plateau_factor
                log.info("valid log loss did not improve: learning rate x%.2f", oc.plateau_factor)
        atomic_csv(pd.DataFrame(self.history), paths.metrics)
        self.trackers.log(row, state["step"])
        self.save_last()
        atomic_write(paths.progress, json.dumps({"epoch": state["epoch"], "epochs": cfg.epochs, "best": state["best"],
                                                 "valid_logloss": valid_loss, "time": time.time()}))
        train_parts = " ".join(f"{p} {row[f'train_{p}']:.4f}" for p in self.parts)
        log.info("%s epoch %d/%d step %d  train loss %.4f (%s)  valid log loss %.4f%s  %.0fs", paths.stem,
                 row["epoch"], cfg.epochs, state["step"], row["train_loss"], train_parts, valid_loss,
                 "  *best*" if improved and cfg.select == "best" else "", row["seconds"])
        for hook in HOOKS.after_evaluation:
            hook(state)
        self.sums, self.t_eval = _fresh_sums(self.parts), time.time()
        self.model.train()

    def add_to_average(self) -> None:
        """Add what training changes at this epoch's end (trained weights, running statistics) to the sum
        --average_last keeps, in float32; frozen weights are the same at every epoch and stay out of it."""
        with torch.no_grad():
            for name, value in self.averaged_tensors():
                value = value.detach().float()
                self.average[name] = self.average[name] + value if name in self.average else value.clone()
        self.state["averaged"] += 1

    def averaged_tensors(self):
        """(name, tensor) of the trained parameters and floating buffers, each once (a tied weight is
        one parameter under two state_dict keys)."""
        yield from ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)
        yield from ((n, b) for n, b in self.model.named_buffers() if b.is_floating_point())

    def save_last(self) -> None:
        """Everything a killed run needs to go on exactly where it stopped."""
        atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                     **({"average": self.average} if self.average else {}),
                     "state": dict(self.state), "rng_torch": torch.get_rng_state(),
                     **({"rng_cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})},
                    self.paths.last)

    # ---- finish --------------------------------------------------------------------------------
    def finish(self) -> FitResult:
        """The kept weights' held-out logits, checkpoint payload and summary: the best evaluation's
        weights (select=best), the last epoch's (select=last) or the mean of the last epochs'
        (select=last with --average_last K)."""
        paths, state, dc = self.paths, self.state, self.cfg.data
        if self.cfg.select == "best" and paths.best.exists():
            self.model.load_state_dict(safe_load(paths.best, map_location=self.device)["model"])
        kept_epoch, kept_step = ((state["best_epoch"], state["best_step"]) if self.cfg.select == "best"
                                 else (state["epoch"], state["step"]))
        if self.average:   # --average_last: the mean of the last epochs' weights
            n = state["averaged"]
            with torch.no_grad():   # in place, by parameter: a tied weight is one parameter under two keys
                for name, tensor in self.averaged_tensors():
                    tensor.copy_((self.average[name] / n).to(tensor.dtype))
            log.info("%s: kept the mean of the weights of the last %d epochs", paths.stem, n)
        valid_logits = predict_logits(self.model, self.valid_ds, self.device, dc.batch_max_frames, dc.max_batch_size)
        summary = {"best_epoch": kept_epoch, "best_step": kept_step, "epochs_run": state["epoch"],
                   "updates": state["step"], "stopped": state["stopped"], "n_train": len(self.train_ds),
                   "select": self.cfg.select, "lowest_valid_epoch": state["best_epoch"],
                   "averaged_epochs": state["averaged"] or 1}
        return FitResult(dict(zip(self.valid_ds.meta["filename"], valid_logits)),
                         self.member.payload(self.model, self.vocab), summary, curves=True)
