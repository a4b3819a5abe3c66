"""Can the blend tell a voice the ear cannot place? Hearing gates compared on a finished children's run.

    python -m readaloud.bench.hearing_gates --run DIR [--source ../shared/data/speechocean_kids] [--out DIR]

DIR is a `bench.children` folder (DIR/data with speakers.csv and the ASR evidence caches model6asr
wrote, DIR/assets with the members' OOF files). For a child Whisper cannot place, every reading comes
out as unrelated words, own sentence or changed, and the members call the right answers wrong. Each
gate is a per-clip signal h of how well the ear hears the clip itself (not the expected text: the
greedy decode's mean log p, its transcript's log p, the probability of no speech, how far tiny.en's
and base's transcripts are apart, hinges of these, the members' disagreement), standardised, and the
blend becomes

    logit = sum_m l_m (w_m + v_m h) + c h + b

(w >= 0: a clip the ear hears badly may have its members' logits shrunk towards the bias). Every
blend is fitted without each fold in turn (cross-fitted; the gates' parameters too) on every OOF clip
(children and any --extra-train speakers), and scored on the source's children: log loss, correct
readings, median and worst child, children above the prior. Nothing is retrained. Writes
hearing_gates.md and hearing_gates.json into --out (default DIR).
"""
from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from readaloud.bench.children import child_lines, children_figures, oof_table, shared_path, source_children
from readaloud.members.gbm.evidence import ASR_VERSION, read_asr_cache, text_comparison
from readaloud.metrics import sigmoid

CLIP_SIGNALS = ("gen_avg_logprob", "tr_mean_logp", "no_speech_prob")
EARS = {"tiny": "whisper-tiny.en", "base": "whisper-base"}   # what model6asr reads, by its signals' prefix
NO_GATE = "none (today's blend)"
GATES = {  # name -> the signals it reads (columns of hearing_signals)
    NO_GATE: [],
    **{f"{b}_{s}": [f"{b}_{s}"] for b in ("tiny", "base") for s in CLIP_SIGNALS},
    "agree_word": ["agree_word"], "agree_phone": ["agree_phone"], "member_gap": ["member_gap"],
    "gen_hinge0.6": ["gen_hinge0.6"], "gen_hinge0.8": ["gen_hinge0.8"], "gen_hinge1.0": ["gen_hinge1.0"],
    "agree_hinge0.4": ["agree_hinge0.4"], "agree_hinge0.6": ["agree_hinge0.6"], "agree_hinge0.8": ["agree_hinge0.8"],
    "unplaced": ["unplaced"],
    "base_gen + agree_phone": ["base_gen_avg_logprob", "agree_phone"],
    "gen_hinge0.8 + agree_hinge0.6": ["gen_hinge0.8", "agree_hinge0.6"],
}


def hearing_signals(table: pd.DataFrame, data: Path, members: list[str]) -> pd.DataFrame:
    """Per OOF clip: what each cached Whisper's greedy decode says of the clip, how far the two
    transcripts are apart, hinges of the lowest decode score and of the disagreement, and the members'
    disagreement. Clips a cache lacks read NaN (standardised to 0: no gate)."""
    out = pd.DataFrame(index=table.index)
    transcripts = {}
    for tag, backbone in EARS.items():
        paths = sorted(glob.glob(str(data / "cache" / f"asr_v{ASR_VERSION}_{backbone}_*.npz")))
        if len(paths) != 1:
            raise FileNotFoundError(f"{data / 'cache'} holds {len(paths)} ASR evidence tables of {backbone}, "
                                    f"not one (run model6asr first; one compute type and decode setting)")
        cache = read_asr_cache(Path(paths[0]))
        clips = [cache.clips.get(f) for f in table["filename"]]
        for s in CLIP_SIGNALS:
            out[f"{tag}_{s}"] = [c.stats.get(s, np.nan) if c else np.nan for c in clips]
        transcripts[tag] = [c.transcript if c else None for c in clips]
    pairs = list(zip(transcripts["tiny"], transcripts["base"]))
    comparisons = [text_comparison(a, b) if a is not None and b is not None else None for a, b in pairs]
    out["agree_word"] = [c["word_edit_rate"] if c else np.nan for c in comparisons]
    out["agree_phone"] = [c["phone_edit_rate"] if c else np.nan for c in comparisons]
    out["member_gap"] = (table[members[0]] - table[members[-1]]).abs()
    lowest = np.minimum(out["tiny_gen_avg_logprob"], out["base_gen_avg_logprob"])
    for t in (0.6, 0.8, 1.0):
        out[f"gen_hinge{t}"] = np.maximum(0, -lowest - t)
    for t in (0.4, 0.6, 0.8):
        out[f"agree_hinge{t}"] = np.maximum(0, np.minimum(out["agree_word"], 1.5) - t)
    out["unplaced"] = np.maximum(0, -lowest - 0.6) * np.minimum(out["agree_word"], 1.0)
    return out


def gated_features(X: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """[members' logits | each logit x each gate | the gates]."""
    return np.hstack([X] + [X * Z[:, [j]] for j in range(Z.shape[1])] + [Z])


def fit_gated(X: np.ndarray, y: np.ndarray, Z: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Parameters of logit = sum_m l_m (w_m + Z v_m) + Z c + b with w >= 0, minimising log loss plus
    a small L2 on the gate terms (v, c); the last entry is b."""
    F = gated_features(X, Z)
    n, m, d = len(y), X.shape[1], F.shape[1]
    y = y.astype(np.float64)
    penalised = np.r_[np.zeros(m), np.ones(d - m)]

    def f(theta):
        z = F @ theta[:d] + theta[d]
        g = (sigmoid(z) - y) / n
        loss = np.mean(np.logaddexp(0, z) - y * z) + l2 * np.sum(penalised * theta[:d] ** 2)
        return loss, np.concatenate([F.T @ g + 2 * l2 * penalised * theta[:d], [g.sum()]])

    x0 = np.r_[np.full(m, 1.0 / m), np.zeros(d - m), 0.0]
    return minimize(f, x0, jac=True, method="L-BFGS-B", bounds=[(0, None)] * m + [(None, None)] * (d - m + 1)).x


def cross_fitted_gated(X: np.ndarray, y: np.ndarray, Zraw: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each fold's logits from a gated blend fitted (and standardised) on the other folds."""
    out = np.zeros(len(y))
    for k in np.unique(folds):
        fit = folds != k
        mu = np.nanmean(Zraw[fit], 0) if Zraw.shape[1] else np.zeros(0)
        sd = np.nanstd(Zraw[fit], 0) + 1e-9 if Zraw.shape[1] else np.ones(0)
        Z = np.clip(np.nan_to_num((Zraw - mu) / sd), -4, 4)
        theta = fit_gated(X[fit], y[fit], Z[fit])
        out[~fit] = gated_features(X[~fit], Z[~fit]) @ theta[:-1] + theta[-1]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--run", required=True, help="a bench.children folder (data/, assets/)")
    p.add_argument("--source", default=str(shared_path("data/speechocean_kids")),
                   help="the children's folder (utterances.csv): whose clips are scored")
    p.add_argument("--out", default=None, help="where hearing_gates.md/json go (default: --run)")
    args = p.parse_args(argv)
    run = Path(args.run)
    data, out = run / "data", Path(args.out or run)
    table, members = oof_table(data, run / "assets")
    signals = hearing_signals(table, data, members)
    X, y, folds = table[members].to_numpy(float), table["score"].to_numpy(float), table["fold"].to_numpy()
    preds = {name: sigmoid(cross_fitted_gated(X, y, signals[columns].to_numpy(float), folds))
             for name, columns in GATES.items()}
    results = children_figures(table, preds, source_children(Path(args.source)))
    lines = child_lines(f"# Hearing gates on {run} (members {', '.join(members)}; the OOF clips of "
                        f"{results[NO_GATE]['n_children']} children scored, all {len(y)} OOF clips fit the "
                        f"blends)", results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hearing_gates.md").write_text("\n".join(lines) + "\n")
    (out / "hearing_gates.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
