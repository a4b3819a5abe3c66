"""Blend rules and member subsets compared on finished benchmark runs, with no retraining.

    python -m readaloud.bench.blends --runs loso_out unseen_out [--subsets a,b a,b,c] [--out DIR]

Each run is a leave-one-speaker-out folder (heldout_<S>/ with a quality benchmark's summary.json)
or one quality benchmark folder. For every member subset and blend rule, the blend is fitted on
the subset's OOF predictions in that run's assets (as get_config.py fits it) and applied to the
members' saved test predictions (test_<model>.csv), so a rule is judged on voices, children or
words the fitted blend never saw. Writes blends.md and blends.json into --out.

The saved test predictions are probabilities clipped to [1e-4, 1 - 1e-4] (the competition's
clip), so a member logit beyond +-9.2 reads as +-9.2 here: the "logit" rule reproduces the
benchmark's own ensemble to within that clip (the report shows both).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from readaloud.metrics import log_loss, logit, sigmoid
from readaloud.pipeline.ensemble import collect_oof, fit_convex_weights, fit_weights, oof_matrix


def fit_capped_weights(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative weights summing to at most 1, and a free bias: the blend may shift and
    soften its members but never sharpen them beyond the surest one."""
    m = X.shape[1]
    y = y.astype(np.float64)

    def f(theta):
        w, b = theta[:m], theta[m]
        z = X @ w + b
        g = (sigmoid(z) - y) / len(y)
        return np.mean(np.logaddexp(0, z) - y * z), np.concatenate([X.T @ g, [g.sum()]])

    cons = [{"type": "ineq", "fun": lambda t: 1.0 - t[:m].sum(),
             "jac": lambda t: np.concatenate([-np.ones(m), [0.0]])}]
    res = minimize(f, np.concatenate([np.full(m, 1.0 / m), [0.0]]), jac=True, method="SLSQP",
                   bounds=[(0.0, 1.0)] * m + [(None, None)], constraints=cons)
    return np.clip(res.x[:m], 0.0, None), float(res.x[m])


def fit_mean(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """The plain mean of the members' logits: nothing fitted."""
    return np.full(X.shape[1], 1.0 / X.shape[1]), 0.0


RULES = {"logit": fit_weights, "convex": fit_convex_weights, "capped": fit_capped_weights, "mean": fit_mean}


def quality_folders(run: Path) -> dict[str, Path]:
    """{name: quality benchmark folder}: heldout_<S> folders of a LOSO run, or the run itself."""
    if (run / "summary.json").exists():
        return {run.name: run}
    found = {p.name.removeprefix("heldout_"): p for p in sorted(run.glob("heldout_*")) if (p / "summary.json").exists()}
    if not found:
        raise SystemExit(f"{run}: no summary.json and no heldout_*/summary.json (run the benchmark first)")
    return found


def test_logits(folder: Path, models: list[str]) -> tuple[np.ndarray, pd.DataFrame] | None:
    """(test labels, member logits by column) from the benchmark's saved test predictions."""
    summary = json.loads((folder / "summary.json").read_text())
    data = Path(summary["data"])
    labels = pd.read_csv(data / "test_labels.csv", dtype={"filename": str})
    cols = {}
    for m in models:
        path = folder / f"test_{m}.csv"
        if not path.exists():
            return None
        pred = pd.read_csv(path, dtype={"filename": str})
        cols[m] = logit(labels[["filename"]].merge(pred, on="filename", how="left")["score"].to_numpy())
    return labels["score"].to_numpy(float), pd.DataFrame(cols)


def evaluate(folder: Path, models: list[str], rule: str) -> dict | None:
    """Fit `rule` on `models`' OOF in the folder's assets; its weights, OOF and test log loss."""
    summary = json.loads((folder / "summary.json").read_text())
    oofs = collect_oof(summary["assets"], models)
    test = test_logits(folder, models)
    if set(oofs) != set(models) or test is None:
        return None
    table, names = oof_matrix(oofs)
    X, y = table[names].to_numpy(np.float64), table["score"].to_numpy()
    w, b = RULES[rule](X, y)
    y_test, Z = test
    p = sigmoid(Z[names].to_numpy() @ w + b)
    return {"weights": dict(zip(names, map(float, w))), "bias": b,
            "oof_logloss": log_loss(y, sigmoid(X @ w + b)), "test_logloss": log_loss(y_test, p)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="LOSO or quality benchmark folders")
    p.add_argument("--subsets", nargs="+", default=None,
                   help="comma-separated member subsets (default: every pair and the whole set of the runs' members)")
    p.add_argument("--rules", default=",".join(RULES), help=f"comma-separated of {', '.join(RULES)}")
    p.add_argument("--out", default="blends_out")
    args = p.parse_args(argv)
    rules = args.rules.split(",")
    if unknown := [r for r in rules if r not in RULES]:
        raise SystemExit(f"unknown rule(s) {unknown}; known: {list(RULES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report, lines = {}, ["# Blend rules on finished benchmark runs (test log loss; fitted on OOF only)\n"]
    for run in map(Path, args.runs):
        folders = quality_folders(run)
        first = json.loads(next(iter(folders.values())).joinpath("summary.json").read_text())
        members = [m for m in first["predictions"] if m != "ensemble"]
        subsets = [s.split(",") for s in args.subsets] if args.subsets else \
            [[a, b] for i, a in enumerate(members) for b in members[i + 1:]] + ([members] if len(members) > 2 else [])
        cols = list(folders) + ["mean"]
        lines += [f"## `{run}`\n", "| members | rule | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
        bench = {name: json.loads((f / "summary.json").read_text())["test_logloss"] for name, f in folders.items()}
        for m in members + ["ensemble"]:
            vals = [bench[n].get(m, {}).get("overall", np.nan) for n in folders]
            lines.append(f"| {m} | (benchmark) | " + " | ".join(f"{v:.4f}" for v in vals) + f" | {np.mean(vals):.4f} |")
        report[str(run)] = {}
        for subset in subsets:
            for rule in rules:
                res = {name: evaluate(f, subset, rule) for name, f in folders.items()}
                if any(r is None for r in res.values()):
                    continue
                vals = [r["test_logloss"] for r in res.values()]
                key = f"{'+'.join(subset)} / {rule}"
                report[str(run)][key] = res
                lines.append(f"| {'+'.join(subset)} | {rule} | " + " | ".join(f"{v:.4f}" for v in vals)
                             + f" | {np.mean(vals):.4f} |")
        lines.append("")
    (out / "blends.md").write_text("\n".join(lines) + "\n")
    (out / "blends.json").write_text(json.dumps(report, indent=1))
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
