"""PNG plots people would rather look at than read (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def plot_training_curves(metrics_csv: str | Path, out: str | Path, title: str = "") -> Path:
    """Train losses, valid log loss and learning rate at every evaluation of one fold."""
    df = pd.read_csv(metrics_csv)
    x = df["step"] if "step" in df else df["epoch"]
    xlabel = "updates" if "step" in df else "epoch"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(x, df["train_bce"], "o-", label="train BCE")
    axes[0].plot(x, df["valid_logloss"], "o-", label="valid log loss")
    axes[0].axhline(np.log(2), color="grey", ls=":", lw=1, label="chance (0.693)")
    axes[0].set_title("classification"), axes[0].legend()
    axes[1].plot(x, df["train_ctc"], "o-", color="C2", label="CTC")
    if "train_bag" in df:
        axes[1].plot(x, df["train_bag"], "o-", color="C4", label="phoneme presence")
    axes[1].set_title("auxiliary phoneme objectives (train)"), axes[1].legend()
    axes[2].plot(x, df["lr"], "o-", color="C3")
    axes[2].set_title("learning rate (encoder)")
    for ax in axes:
        ax.set_xlabel(xlabel)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _grouped_bars(groups: list[str], series: dict[str, list[float]], ylabel: str, title: str,
                  out: str | Path) -> Path:
    """Bars of several series side by side for each group, saved as a PNG."""
    fig, ax = plt.subplots(figsize=(max(5, 1.7 * len(groups)), 3.7))
    width = 0.8 / max(1, len(series))
    for j, (label, values) in enumerate(series.items()):
        ax.bar(np.arange(len(groups)) + j * width, values, width, label=label)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
    ax.set_ylabel(ylabel), ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)


def plot_cv_bars(table: pd.DataFrame, out: str | Path) -> Path:
    """CV log loss per model (bars = folds), from check_models' table (model, fold, logloss)."""
    models = sorted(table["model"].unique())
    series = {f"fold {f}": [table[(table.model == m) & (table.fold == f)]["logloss"].mean() for m in models]
              for f in sorted(table["fold"].unique())}
    return _grouped_bars(models, series, "log loss", "cross-validation log loss per fold", out)


def plot_confusion_by_task(oof: pd.DataFrame, out: str | Path, title: str = "") -> Path:
    """One 2x2 confusion matrix per task (label vs prediction at 0.5), counts in the cells."""
    tasks = sorted(oof["task"].astype(str).unique())
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(3.2 * max(1, len(tasks)), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        g = oof[oof["task"].astype(str) == task]
        pred = (g["pred"] >= 0.5).astype(int)
        m = np.array([[((g["score"] == t) & (pred == p)).sum() for p in (0, 1)] for t in (0, 1)])
        ax.imshow(m, cmap="Blues")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", color="black")
        ax.set_xticks([0, 1], ["pred 0", "pred 1"]), ax.set_yticks([0, 1], ["said 0", "said 1"])
        ax.set_title(f"{task}\nacc {np.trace(m) / max(1, m.sum()):.2f}", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)


def plot_reliability(y: np.ndarray, preds: dict, out: str | Path, bins: int = 10) -> Path:
    """Observed rate of score = 1 against the predicted probability, per model (and counts)."""
    fig, ax = plt.subplots(figsize=(5, 4.6))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfect calibration")
    edges = np.linspace(0, 1, bins + 1)
    for name, p in preds.items():
        idx = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
        xs, ys = [], []
        for b in range(bins):
            m = idx == b
            if m.sum() >= 5:
                xs.append(p[m].mean())
                ys.append(y[m].mean())
        ax.plot(xs, ys, "o-", label=name)
    ax.set_xlabel("predicted P(correct)"), ax.set_ylabel("observed share correct")
    ax.set_title("reliability (test)"), ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)


def plot_task_losses(table: dict, out: str | Path) -> Path:
    """Test log loss per task for each predictor (grouped bars)."""
    keys = [k for k in next(iter(table.values())) if k.startswith("task=")]
    series = {name: [row[k] for k in keys] for name, row in table.items()}
    return _grouped_bars([k.removeprefix("task=") for k in keys], series, "test log loss", "per task", out)


def plot_grouped_losses(table: dict[str, dict[str, float]], out: str | Path, title: str) -> Path:
    """{predictor: {group: loss}} as grouped bars (e.g. held-out speakers x predictors)."""
    groups = list(next(iter(table.values())))
    series = {name: [row[g] for g in groups] for name, row in table.items()}
    return _grouped_bars(groups, series, "test log loss", title, out)
