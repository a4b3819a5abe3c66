"""Cross-validation report: log loss per model and fold, and which folds need retraining.

A fold that needs attention is a `FoldIssue` record (its kind, the seed a diverged fold used,
the outlier's loss), and what to do about it is read from the record, never from its text. A
retrained fold trains with the config its model was trained with: its own saved config, or a
sibling fold's (`saved_config_for`), loaded from that file by the fold script (--config).
"""
from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..checkpoints import CheckpointError, atomic_write, safe_load
from ..config import RUNTIME_KEYS, RunConfig, _leaves, saved_config_dict
from ..layout import FoldPaths, retrain_command
from ..metrics import log_loss
from ..variants import variant_config

@dataclass(frozen=True)
class FoldIssue:
    """Why a fold is not usable as it is."""
    model: str
    fold: int
    kind: str                   # missing | unfinished | aborted | broken | no oof | broken oof | non-finite | outlier
    detail: str = ""
    seed: int | None = None     # aborted: the seed it diverged with
    loss: float = math.nan      # outlier / non-finite: the fold's log loss
    median: float = math.nan    # outlier: the model's median fold log loss

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind

    def retrain_args(self) -> list[str]:
        """Resume what is unfinished, redo what is broken or an outlier, and give a diverged
        (aborted or non-finite) fold a new seed."""
        if self.kind in ("missing", "unfinished"):
            return []
        if self.kind in ("aborted", "non-finite"):
            return ["--restart", "--seed", str(self.seed + 1 if self.seed is not None else 1)]
        return ["--force"]


@dataclass(frozen=True)
class FoldState:
    """A fold as check finds it: 'ok' or the kind of problem, with its log loss when readable."""
    kind: str
    loss: float = math.nan
    detail: str = ""
    seed: int | None = None

    @property
    def text(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind


def fold_status(paths: FoldPaths, deep: bool = True) -> FoldState:
    if not paths.checkpoint.exists():
        if paths.aborted.exists():
            info = json.loads(paths.aborted.read_text())
            seed = info.get("seed")
            return FoldState("aborted", detail=f"{info.get('reason')} at step {info.get('step')} (seed {seed})",
                             seed=int(seed) if seed is not None else None)
        return FoldState("unfinished" if paths.run_dir.exists() else "missing")
    if deep:
        try:
            if "state_dict" not in safe_load(paths.checkpoint):
                return FoldState("broken", detail="no weights in checkpoint")
        except CheckpointError as exc:
            return FoldState("broken", detail=str(exc))
    if not paths.oof.exists():
        return FoldState("no oof")
    try:
        oof = pd.read_csv(paths.oof)
        loss = log_loss(oof["score"], oof["pred"])
    except Exception as exc:
        return FoldState("broken oof", detail=str(exc))
    if not math.isfinite(loss):
        seed = (paths.read_summary() or {}).get("config", {}).get("seed")
        return FoldState("non-finite", loss, seed=seed)
    return FoldState("ok", loss)


def flag_outliers(losses: dict[int, float], rel: float = 0.2, z: float = 3.5) -> set[int]:
    """Folds clearly worse than the model's others (robust z-score on the median and MAD)."""
    vals = {f: l for f, l in losses.items() if math.isfinite(l)}
    if len(vals) < 3:
        return set()
    arr = np.array(list(vals.values()))
    med = float(np.median(arr))
    mad = float(np.median(np.abs(arr - med))) * 1.4826 + 1e-9
    return {f for f, l in vals.items() if l > med * (1 + rel) and (l - med) / mad > z}


def check(assets: str | Path, models: list[str], n_folds: int, data: str | Path = "data",
          deep: bool = True) -> tuple[pd.DataFrame, list[FoldIssue]]:
    """Table rows (model, fold, status, logloss) and the folds to retrain."""
    rows, todo = [], []
    for m in models:
        losses = {}
        for f in range(n_folds):
            state = fold_status(FoldPaths(Path(assets), m, f), deep)
            rows.append({"model": m, "fold": f, "status": state.text, "logloss": state.loss})
            losses[f] = state.loss
            if state.kind != "ok":
                todo.append(FoldIssue(m, f, state.kind, state.detail, state.seed, state.loss))
        median = float(np.median([l for l in losses.values() if math.isfinite(l)] or [math.nan]))
        for f in sorted(flag_outliers(losses)):
            todo.append(FoldIssue(m, f, "outlier", f"{losses[f]:.4f} vs median {median:.4f}", loss=losses[f],
                                  median=median))
    return pd.DataFrame(rows), todo


def oof_logloss(assets: str | Path, model: str, folds) -> float:
    files = [p.oof for p in (FoldPaths(Path(assets), model, f) for f in folds) if p.oof.exists()]
    if not files:
        return math.nan
    oof = pd.concat([pd.read_csv(p) for p in files])
    return log_loss(oof["score"], oof["pred"])


def render_table(table: pd.DataFrame, assets: str | Path) -> str:
    """Models as rows, folds as columns, plus the pooled OOF log loss."""
    if table.empty:
        return "(no models)"
    folds = sorted(table["fold"].unique())
    lines = ["model".ljust(14) + "".join(f"fold {f}".rjust(10) for f in folds) + "OOF".rjust(10)]
    for m, g in table.groupby("model", sort=False):
        cells = []
        for f in folds:
            r = g[g.fold == f].iloc[0]
            cells.append(f"{r.logloss:.4f}" if r.status == "ok" else r.status.split(":")[0][:9])
        lines.append(m.ljust(14) + "".join(c.rjust(10) for c in cells) + f"{oof_logloss(assets, m, folds):10.4f}")
    return "\n".join(lines)


def saved_config_for(assets: str | Path, variant: str, fold: int, n_folds: int) -> Path | None:
    """The saved config a retrained fold should train with: its own, else a sibling fold's
    (the model's options, e.g. --epochs and --backbone, not the bare variant's)."""
    for f in [fold] + [f for f in range(n_folds) if f != fold]:
        fp = FoldPaths(Path(assets), variant, f)
        for source in (fp.config, fp.summary):
            try:
                RunConfig.from_dict(saved_config_dict(source))
                return source
            except Exception:
                continue
    return None


def config_changes(cfg: RunConfig, variant: str) -> list[str]:
    """The options of `cfg` beyond the variant's defaults, as command-line options (to show)."""
    default = {k: getattr(o, f.name) for k, (o, f) in _leaves(variant_config(variant)).items()}
    out = []
    for key, (owner, f) in _leaves(cfg).items():
        value = getattr(owner, f.name)
        if key not in RUNTIME_KEYS and default.get(key) != value:
            out += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def retrain_commands(todo: list[FoldIssue], n_folds: int, data, assets) -> list[str]:
    """The command per flagged fold: with --config naming the saved config it trains with
    (followed, for the reader, by how that config differs from the variant's)."""
    cmds = []
    for issue in todo:
        source = saved_config_for(assets, issue.model, issue.fold, n_folds)
        args = (["--config", str(source)] if source else []) + issue.retrain_args()
        cmd = retrain_command(issue.model, issue.fold, n_folds, data, assets, " ".join(shlex.quote(a) for a in args))
        if source:
            changes = config_changes(RunConfig.from_dict(saved_config_dict(source)), issue.model)
            cmd += f"  # trained with {' '.join(shlex.quote(a) for a in changes) or 'the variant defaults'}"
        cmds.append(cmd)
    return cmds


def retrain_specs(todo: list[FoldIssue], n_folds: int, assets) -> list[tuple[str, int, list[str]]]:
    """(variant, fold, options) for the runner. Each fold's config is copied to its own run
    folder first (FoldPaths.requested_config, kept by --force), so a fold never reads a sibling's
    file while that sibling's own retrain clears it."""
    specs = []
    for issue in todo:
        source = saved_config_for(assets, issue.model, issue.fold, n_folds)
        args = []
        if source:
            own = FoldPaths(Path(assets), issue.model, issue.fold).requested_config
            own.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(own, json.dumps(saved_config_dict(source), indent=1))
            args = ["--config", str(own)]
        specs.append((issue.model, issue.fold, args + issue.retrain_args()))
    return specs
