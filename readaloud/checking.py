"""Cross-validation report: log loss per model and fold, and which folds need retraining."""
from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoints import CheckpointError, safe_load
from .metrics import log_loss
from .training import FoldPaths, retrain_command


def fold_status(paths: FoldPaths, deep: bool = True) -> tuple[str, float]:
    """('ok' | 'missing' | 'running' | 'broken: why' | 'no oof', fold log loss)."""
    if not paths.checkpoint.exists():
        aborted = paths.run_dir / "aborted.json"
        if aborted.exists():
            info = json.loads(aborted.read_text())
            return f"aborted: {info.get('reason')} at step {info.get('step')} (seed {info.get('seed')})", math.nan
        return ("unfinished" if paths.run_dir.exists() else "missing"), math.nan
    if deep:
        try:
            ck = safe_load(paths.checkpoint)
            if "state_dict" not in ck:
                return "broken: no weights in checkpoint", math.nan
        except CheckpointError as exc:
            return f"broken: {exc}", math.nan
    if not paths.oof.exists():
        return "no oof", math.nan
    try:
        oof = pd.read_csv(paths.oof)
        loss = log_loss(oof["score"], oof["pred"])
    except Exception as exc:
        return f"broken oof: {exc}", math.nan
    if not math.isfinite(loss):
        return "non-finite", loss
    return "ok", loss


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
          deep: bool = True) -> tuple[pd.DataFrame, list[tuple[str, int, str]]]:
    """Table rows (model, fold, status, logloss) and the (model, fold, reason) to retrain."""
    rows, todo = [], []
    for m in models:
        losses = {}
        for f in range(n_folds):
            status, loss = fold_status(FoldPaths(Path(assets), m, f), deep)
            rows.append({"model": m, "fold": f, "status": status, "logloss": loss})
            losses[f] = loss
            if status != "ok":
                todo.append((m, f, status))
        for f in sorted(flag_outliers(losses)):
            todo.append((m, f, f"outlier: {losses[f]:.4f} vs median {np.median([l for l in losses.values() if math.isfinite(l)]):.4f}"))
    return pd.DataFrame(rows), todo


def oof_logloss(assets: str | Path, model: str) -> float:
    files = sorted(Path(assets).glob(f"{model}_*_oof.csv"))
    files = [p for p in files if p.name[len(model) + 1:-len("_oof.csv")].isdigit()]
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
        lines.append(m.ljust(14) + "".join(c.rjust(10) for c in cells) + f"{oof_logloss(assets, m):10.4f}")
    return "\n".join(lines)


def retrain_args(reason: str) -> list[str]:
    """Resume what is unfinished, redo what is broken or an outlier, and give a diverged
    (aborted or non-finite) fold a new seed."""
    import re
    if reason.startswith(("missing", "unfinished")):
        return []
    if reason.startswith(("aborted", "non-finite")):
        seed = re.search(r"seed (\d+)", reason)
        return ["--restart", "--seed", str(int(seed.group(1)) + 1 if seed else 1)]
    return ["--force"]


# Set per job by train.py, not part of what a fold learns.
RUNTIME_KEYS = {"threads"}


def trained_overrides(assets: str | Path, variant: str, fold: int, n_folds: int) -> list[str]:
    """The options a fold was (or its sibling folds were) trained with beyond the variant's
    defaults, e.g. ['--epochs', '2', '--model.backbone', 'assets/pretrained_encoder'], so a
    retrained fold matches the rest of its model rather than the bare variant."""
    from .config import RunConfig, _leaves
    from .variants import variant_config
    saved = None
    paths = [FoldPaths(Path(assets), variant, f) for f in [fold] + [f for f in range(n_folds) if f != fold]]
    for fp in paths:
        for source in (fp.run_dir / "config.json", fp.summary):
            try:
                d = json.loads(source.read_text())
                saved = RunConfig.from_dict(d.get("config", d) if source == fp.summary else d)
                break
            except Exception:
                continue
        if saved is not None:
            break
    if saved is None:
        return []
    default = {k: getattr(o, f.name) for k, (o, f) in _leaves(variant_config(variant)).items()}
    out = []
    for key, (owner, f) in _leaves(saved).items():
        value = getattr(owner, f.name)
        if key not in RUNTIME_KEYS and default.get(key) != value:
            out += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def retrain_commands(todo, n_folds: int, data, assets) -> list[str]:
    """The command per flagged fold (see retrain_args), with the options it was trained with."""
    return [retrain_command(m, f, n_folds, data, assets,
                            " ".join(shlex.quote(a) for a in trained_overrides(assets, m, f, n_folds)
                                     + retrain_args(reason)))
            for m, f, reason in todo]
