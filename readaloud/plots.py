"""PNG plots people would rather look at than read (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def plot_training_curves(metrics_csv: str | Path, out: str | Path, title: str = "") -> Path:
    """Train loss parts, valid log loss and learning rate per epoch of one fold."""
    df = pd.read_csv(metrics_csv)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(df["epoch"], df["train_bce"], "o-", label="train BCE")
    axes[0].plot(df["epoch"], df["valid_logloss"], "o-", label="valid log loss")
    axes[0].axhline(np.log(2), color="grey", ls=":", lw=1, label="chance (0.693)")
    axes[0].set_xlabel("epoch"), axes[0].set_title("classification"), axes[0].legend()
    axes[1].plot(df["epoch"], df["train_ctc"], "o-", color="C2")
    axes[1].set_xlabel("epoch"), axes[1].set_title("train CTC (phonemes)")
    axes[2].plot(df["epoch"], df["lr"], "o-", color="C3")
    axes[2].set_xlabel("epoch"), axes[2].set_title("learning rate")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_cv_bars(table: pd.DataFrame, out: str | Path) -> Path:
    """CV log loss per model (bars = folds), from check_models' table (model, fold, logloss)."""
    models = sorted(table["model"].unique())
    folds = sorted(table["fold"].unique())
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(models)), 3.6))
    width = 0.8 / max(1, len(folds))
    for j, f in enumerate(folds):
        vals = [table[(table.model == m) & (table.fold == f)]["logloss"].mean() for m in models]
        ax.bar(np.arange(len(models)) + j * width, vals, width, label=f"fold {f}")
    ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2, models)
    ax.set_ylabel("log loss"), ax.set_title("cross-validation log loss per fold")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)
