"""Alignment features of a response against the TTS reference of its expected text.

For the gradient-boosting ensemble member (gbm.py): a fixed-length vector per clip from the
cached Whisper log-mel of the response and of the reference (10 ms frames, Whisper
normalisation (log10(mel) + 4) / 4). The evidence is meant to be speaker independent:

- energy-based voice activity relative to the clip's own maximum: speech segments separated
  by pauses (at two pause lengths and two thresholds), energy peaks (syllable nuclei),
  pauses and leading/trailing silence; the same for the reference; response/reference
  ratios of speech duration, span and peaks; segments and peaks against the expected
  text's words and vowels (a dropped or an added word changes the number of bursts,
  whoever speaks); the text's counts of words, letters, phonemes and vowels;
- DTW between reference and response on cepstra of their speech frames (pauses left out;
  DCT of the log-mel, c1..c13 mean-normalised per utterance, + deltas, cosine distance): the path-normalised cost, the same relative
  to the matrix's mean cost (the cost of unrelated frames for these two voices), the worst
  stretch along the reference and along the response, path shape (diagonal / stalled
  steps, longest stall, deviation from the diagonal, local slope spread), order-free
  coverage (each reference frame's best match anywhere, and each response frame's), and
  subsequence DTW both ways (reference inside the response: insertions; response inside the
  reference: omissions) with the share of the other side it spans.

Everything is vectorised numpy except the DTW recursions (librosa, numba-compiled); a clip
takes a few milliseconds.
"""
from __future__ import annotations

import logging
import math
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ...features import merge_npz_cache, read_npz_cache
from ...layout import alignment_cache_path as layout_alignment_cache_path
from ...text import normalise_text, text_units

log = logging.getLogger("readaloud")

ALIGN_VERSION = 1
FRAME_S = 0.01          # seconds per cached frame
DTW_POOL = 2            # frames averaged per DTW step (20 ms)
N_CEPS = 13             # c1..c13 (c0, the level, is left out)
VAD_DB = 30.0           # speech: smoothed frame energy within this many dB of the clip's max
VAD_DB_STRICT = 20.0
SHORT_GAP = 8           # frames: pauses shorter than this do not split a segment (80 ms)
LONG_GAP = 25           # 250 ms
MIN_SEGMENT = 5         # frames: shorter bursts are not segments (50 ms)
IPA_VOWELS = set("aeiouyæɑɒɔəɛɜɪʊʌɐɚɝɨʉøœɯɤɵ")


# ---- text ----------------------------------------------------------------------------------

@lru_cache(maxsize=100_000)
def text_features(text: str) -> tuple[tuple[str, float], ...]:
    """Counts of the expected text: words, letters, phonemes and vowels (espeak when available,
    else from the spelling), and a spelling-based syllable estimate."""
    norm = re.sub(r"\s+", " ", str(text).lower()).strip()
    words = re.findall(r"[a-z0-9']+", norm)
    letters = sum(len(w) for w in words)
    syll = sum(max(1, len(re.findall(r"[aeiouy]+", w))) for w in words)
    try:
        phonemes = text_units(norm, "phoneme")
    except Exception:  # no espeak: the spelling is the fallback
        phonemes = ()
    if phonemes and not all(len(p) == 1 and p.isalnum() and p.isascii() for p in phonemes):
        n_ph = len(phonemes)
        n_vow = sum(any(c in IPA_VOWELS for c in p) for p in phonemes)
    else:
        n_ph, n_vow = letters, syll
    return (("n_words", float(len(words))), ("n_letters", float(letters)), ("n_phonemes", float(n_ph)),
            ("n_vowels", float(max(n_vow, 1 if words else 0))), ("n_syll_spelling", float(syll)))


# ---- energy, voice activity, segments --------------------------------------------------------

def energy_db(logmel: np.ndarray) -> np.ndarray:
    """Frame energy in dB from a Whisper-normalised log-mel ([T, n_mels])."""
    x = np.asarray(logmel, dtype=np.float32)
    return 10.0 * np.log10(np.power(np.float32(10.0), 4.0 * x - 4.0).sum(axis=1) + 1e-10)


def smooth(x: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or x.size == 0:
        return x
    pad = np.pad(x, (k // 2, k - 1 - k // 2), mode="edge")
    c = np.cumsum(np.concatenate([[0.0], pad]))
    return (c[k:] - c[:-k]) / k


def runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and (exclusive) ends of the True runs of a boolean array."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


def segments(mask: np.ndarray, min_gap: int, min_len: int = MIN_SEGMENT) -> tuple[np.ndarray, np.ndarray]:
    """Speech segments: runs of `mask` joined across gaps shorter than `min_gap`, then runs
    shorter than `min_len` dropped."""
    s, e = runs(mask)
    if s.size > 1:
        keep = (s[1:] - e[:-1]) >= min_gap
        s = np.concatenate([s[:1], s[1:][keep]])
        e = np.concatenate([e[:-1][keep], e[-1:]])
    long = (e - s) >= min_len
    return s[long], e[long]


def _peaks(env: np.ndarray, floor: float) -> int:
    """Energy peaks (syllable nuclei): local maxima above `floor`, 5 dB prominent, 80 ms apart."""
    if env.size < 3:
        return 0
    from scipy.signal import find_peaks
    idx, _ = find_peaks(env, height=floor, prominence=5.0, distance=8)
    return max(int(idx.size), int(env.max() > floor))  # a single burst peaking at an edge is one


def energy_profile(logmel: np.ndarray) -> dict:
    """Voice-activity and energy-contour statistics of one utterance (durations in seconds)."""
    e = energy_db(logmel)
    n = e.size
    out: dict[str, float] = {"dur": n * FRAME_S}
    if n == 0:
        return out
    es = smooth(e, 5)
    top = float(es.max())
    floor = float(np.percentile(es, 5))
    speech = es > top - VAD_DB
    strict = es > top - VAD_DB_STRICT
    idx = np.flatnonzero(speech)
    first, last = (int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, n)
    s1, e1 = segments(speech, SHORT_GAP)
    s2, e2 = segments(speech, LONG_GAP)
    s3, e3 = segments(strict, SHORT_GAP)
    inner = speech[first:last]
    ps, pe = runs(~inner)
    pauses = (pe - ps) if ps.size else np.zeros(0, int)
    in_speech = es[first:last]
    out.update({
        "speech": float(speech.sum()) * FRAME_S,
        "speech_strict": float(strict.sum()) * FRAME_S,
        "span": (last - first) * FRAME_S,
        "lead": first * FRAME_S,
        "trail": (n - last) * FRAME_S,
        "segs": float(s1.size),
        "segs_long": float(s2.size),
        "segs_strict": float(s3.size),
        "peaks": float(_peaks(smooth(e, 7)[first:last], top - 25.0)),
        "pause_max": float(pauses.max()) * FRAME_S if pauses.size else 0.0,
        "pauses_150": float((pauses >= 15).sum()),
        "pauses_300": float((pauses >= 30).sum()),
        "pause_frac": float((~inner).mean()) if inner.size else 0.0,
        "seg_max": float((e1 - s1).max()) * FRAME_S if s1.size else 0.0,
        "range_db": top - floor,
        "energy_std": float(in_speech.std()) if in_speech.size else 0.0,
        "flux": float(np.abs(np.diff(in_speech)).mean()) if in_speech.size > 1 else 0.0,
    })
    out["mask"] = speech  # the frames DTW compares (not a feature)
    return out


# ---- DTW -------------------------------------------------------------------------------------

def cepstra(logmel: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """c1..c13 and their deltas of the speech frames (`mask`; pauses left out, so that how long
    a speaker pauses does not count as a mismatch) pooled by 20 ms, mean-normalised, unit length."""
    from scipy.fft import dct
    x = np.asarray(logmel, dtype=np.float32)
    if mask is not None and mask.sum() >= 2 * DTW_POOL:
        x = x[mask]
    if x.shape[0] >= DTW_POOL:
        t = x.shape[0] // DTW_POOL * DTW_POOL
        x = x[:t].reshape(-1, DTW_POOL, x.shape[1]).mean(axis=1)
    c = dct(x, type=2, norm="ortho", axis=1)[:, 1:1 + N_CEPS].astype(np.float64)
    c -= c.mean(axis=0, keepdims=True)
    c = np.hstack([c, np.gradient(c, axis=0) if c.shape[0] > 1 else np.zeros_like(c)])
    return c / (np.linalg.norm(c, axis=1, keepdims=True) + 1e-8)


def _max_run(mask: np.ndarray) -> int:
    s, e = runs(mask)
    return int((e - s).max()) if s.size else 0


def _profile_max(idx: np.ndarray, cost: np.ndarray, n: int, k: int = 10) -> tuple[float, float]:
    """Mean local path cost per frame of one side, smoothed over k frames: (max, 90th pct)."""
    cnt = np.bincount(idx, minlength=n)
    per = np.bincount(idx, weights=cost, minlength=n) / np.maximum(cnt, 1)
    sm = smooth(per, min(k, n))
    return float(sm.max()), float(np.percentile(sm, 90))


def _subsequence(C: np.ndarray) -> tuple[float, float]:
    """Subsequence DTW of the rows (all of them) inside the columns: (path-normalised cost,
    share of the columns the match spans)."""
    from librosa.sequence import dtw
    D, wp = dtw(C=C, subseq=True, backtrack=True)
    if C.shape[0] > C.shape[1]:  # librosa returns (column, row) pairs in that case
        wp = wp[:, ::-1]
    cost = float(D[wp[0, 0], wp[0, 1]]) / len(wp)
    return cost, float(wp[:, 1].max() - wp[:, 1].min() + 1) / C.shape[1]


def dtw_features(ref_c: np.ndarray, resp_c: np.ndarray) -> dict:
    """DTW of reference (rows) against response (columns) on unit-length cepstra."""
    from librosa.sequence import dtw
    n, m = ref_c.shape[0], resp_c.shape[0]
    out: dict[str, float] = {}
    if n < 2 or m < 2:
        return out
    C = np.clip(1.0 - ref_c @ resp_c.T, 0.0, 2.0)
    c_mean = float(C.mean()) + 1e-6
    D, wp = dtw(C=C, backtrack=True)
    p = wp[::-1]
    cost = C[p[:, 0], p[:, 1]]
    path_cost = float(D[-1, -1]) / len(p)
    di, dj = np.diff(p[:, 0]), np.diff(p[:, 1])
    diag, vert, horiz = (di == 1) & (dj == 1), (di == 1) & (dj == 0), (di == 0) & (dj == 1)
    # deviation from the straight line between the corners, as a share of the response
    expect = p[:, 0] * ((m - 1) / max(n - 1, 1))
    dev = (p[:, 1] - expect) / m
    # local slope over windows of 8 path steps (log of response frames per reference frame)
    w = min(8, len(di))
    cdi = np.cumsum(np.concatenate([[0], di]))
    cdj = np.cumsum(np.concatenate([[0], dj]))
    slope = np.log((cdj[w:] - cdj[:-w] + 0.5) / (cdi[w:] - cdi[:-w] + 0.5))
    ref_max, ref_p90 = _profile_max(p[:, 0], cost, n)
    resp_max, resp_p90 = _profile_max(p[:, 1], cost, m)
    row_min, col_min = C.min(axis=1), C.min(axis=0)
    out.update({
        "dtw_cost": path_cost,
        "dtw_cost_rel": path_cost / c_mean,
        "dtw_cost_mean": c_mean,
        "dtw_ref_worst": ref_max / c_mean,
        "dtw_ref_p90": ref_p90 / c_mean,
        "dtw_resp_worst": resp_max / c_mean,
        "dtw_resp_p90": resp_p90 / c_mean,
        "dtw_diag_frac": float(diag.mean()),
        "dtw_vert_frac": float(vert.mean()),
        "dtw_horiz_frac": float(horiz.mean()),
        "dtw_vert_run": _max_run(vert) * DTW_POOL * FRAME_S,
        "dtw_horiz_run": _max_run(horiz) * DTW_POOL * FRAME_S,
        "dtw_dev_max": float(np.abs(dev).max()),
        "dtw_dev_std": float(dev.std()),
        "dtw_slope_std": float(slope.std()) if slope.size else 0.0,
        "dtw_slope_absmax": float(np.abs(slope).max()) if slope.size else 0.0,
        "cover_ref": float(row_min.mean()) / c_mean,
        "cover_ref_worst": float(smooth(row_min, min(10, n)).max()) / c_mean,
        "cover_resp": float(col_min.mean()) / c_mean,
        "cover_resp_worst": float(smooth(col_min, min(10, m)).max()) / c_mean,
    })
    # the reference inside the response (extra speech around it costs nothing) ...
    sub, span = _subsequence(C)
    out["sub_ref_in_resp"] = sub / c_mean
    out["sub_ref_in_resp_gain"] = (path_cost - sub) / c_mean
    out["sub_resp_span"] = span
    # ... and the response inside the reference (a part of the reference left unsaid costs nothing)
    sub, span = _subsequence(np.ascontiguousarray(C.T))
    out["sub_resp_in_ref"] = sub / c_mean
    out["sub_resp_in_ref_gain"] = (path_cost - sub) / c_mean
    out["sub_ref_span"] = span
    return out


# ---- one clip, many clips ---------------------------------------------------------------------

# Of the response's own profile only what does not describe the voice: counts and pauses.
# Its absolute durations (speaking rate), level range, energy spread and flux were measured to
# tell speakers apart more than right from wrong (they made an unseen speaker's test log loss
# worse), so durations enter only relative to the reference's.
ENERGY_KEYS = ["lead", "trail", "segs", "segs_long", "segs_strict", "peaks", "pause_max", "pauses_150",
               "pauses_300", "pause_frac"]
REF_KEYS = ["dur", "speech", "segs", "segs_long", "peaks", "pause_max"]
DTW_KEYS = ["dtw_cost", "dtw_cost_rel", "dtw_cost_mean", "dtw_ref_worst", "dtw_ref_p90", "dtw_resp_worst",
            "dtw_resp_p90", "dtw_diag_frac", "dtw_vert_frac", "dtw_horiz_frac", "dtw_vert_run", "dtw_horiz_run",
            "dtw_dev_max", "dtw_dev_std", "dtw_slope_std", "dtw_slope_absmax", "cover_ref", "cover_ref_worst",
            "cover_resp", "cover_resp_worst", "sub_ref_in_resp", "sub_ref_in_resp_gain", "sub_resp_span",
            "sub_resp_in_ref", "sub_resp_in_ref_gain", "sub_ref_span"]
TEXT_KEYS = ["n_words", "n_letters", "n_phonemes", "n_vowels", "n_syll_spelling"]
RATIO_KEYS = ["speech_ratio", "span_ratio", "dur_log_ratio", "peaks_ratio", "peaks_diff", "segs_diff_ref",
              "segs_per_word", "segs_minus_words", "segs_long_per_word", "segs_long_minus_words",
              "peaks_per_vowel", "peaks_minus_vowels", "ref_speech_per_vowel"]
ACOUSTIC_NAMES = ([f"resp_{k}" for k in ENERGY_KEYS] + [f"ref_{k}" for k in REF_KEYS] + RATIO_KEYS
                  + DTW_KEYS + TEXT_KEYS)
CATEGORY_NAMES = ["task_code", "grade_code"]
FEATURE_NAMES = ACOUSTIC_NAMES + CATEGORY_NAMES


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def clip_features(resp: np.ndarray, ref: np.ndarray, text: str) -> np.ndarray:
    """The acoustic feature vector (ACOUSTIC_NAMES order) of one response against its reference."""
    r = energy_profile(resp)
    q = energy_profile(ref)
    t = dict(text_features(text))
    f = {f"resp_{k}": r.get(k, math.nan) for k in ENERGY_KEYS}
    f.update({f"ref_{k}": q.get(k, math.nan) for k in REF_KEYS})
    nw, nv = t["n_words"], t["n_vowels"]
    rs, qs = r.get("speech", math.nan), q.get("speech", math.nan)
    f.update({
        "speech_ratio": _ratio(rs, qs),
        "span_ratio": _ratio(r.get("span", math.nan), q.get("span", math.nan)),
        "dur_log_ratio": math.log(_ratio(r["dur"], q["dur"])) if r["dur"] > 0 and q["dur"] > 0 else math.nan,
        "peaks_ratio": _ratio(r.get("peaks", math.nan), q.get("peaks", math.nan)),
        "peaks_diff": r.get("peaks", math.nan) - q.get("peaks", math.nan),
        "segs_diff_ref": r.get("segs", math.nan) - q.get("segs", math.nan),
        "segs_per_word": _ratio(r.get("segs", math.nan), nw),
        "segs_minus_words": r.get("segs", math.nan) - nw,
        "segs_long_per_word": _ratio(r.get("segs_long", math.nan), nw),
        "segs_long_minus_words": r.get("segs_long", math.nan) - nw,
        "peaks_per_vowel": _ratio(r.get("peaks", math.nan), nv),
        "peaks_minus_vowels": r.get("peaks", math.nan) - nv,
        "ref_speech_per_vowel": _ratio(qs, nv),
    })
    if "mask" in r and "mask" in q:
        f.update(dtw_features(cepstra(ref, q["mask"]), cepstra(resp, r["mask"])))
    f.update(t)
    out = np.array([f.get(k, math.nan) for k in ACOUSTIC_NAMES], dtype=np.float64)
    out[~np.isfinite(out)] = np.nan
    return out


def acoustic_table(meta: pd.DataFrame, clips, refs, cache: str | Path | None = None,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """[len(meta), len(ACOUSTIC_NAMES)] features and a mask of the rows that could be computed
    (clip in the feature store and the expected text's reference in the bank).

    With `cache` (alignment_cache_path), rows computed before are read back instead: the
    features depend only on the clip and its reference, so every fold and every rerun would
    otherwise recompute the same numbers."""
    X = np.full((len(meta), len(ACOUSTIC_NAMES)), np.nan)
    ok = np.zeros(len(meta), bool)
    norm = [normalise_text(text) for text in meta["expected_text"]]
    keys = [f"{name}\t{text}" for name, text in zip(meta["filename"], norm)]
    known = _read_cache(Path(cache)) if cache is not None else {}
    todo = []
    for i, (name, text, key) in enumerate(zip(meta["filename"], norm, keys)):
        if name not in clips or text not in refs.store:
            continue
        ok[i] = True
        if key in known:
            X[i] = known[key]
        else:
            todo.append(i)
    for i in tqdm(todo, desc="alignment features", unit="clip", disable=not progress or not todo):
        text = meta["expected_text"].iloc[i]
        X[i] = clip_features(clips.get(meta["filename"].iloc[i]), refs.features(text), text)
    if cache is not None and todo:
        _add_to_cache(Path(cache), {keys[i]: X[i] for i in todo})
    return X, ok


def alignment_cache_path(data_dir: str | Path, refs) -> Path:
    """One table per data folder, TTS voice, feature parameters and version of this module."""
    return layout_alignment_cache_path(data_dir, ALIGN_VERSION, refs.root.name, refs.params.key())


def _parse_table(z) -> dict[str, np.ndarray]:
    keys, X = z["keys"], z["X"]
    if X.shape != (len(keys), len(ACOUSTIC_NAMES)):
        raise ValueError(f"table of shape {X.shape} for {len(keys)} keys")
    return dict(zip(keys.tolist(), X))


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    return read_npz_cache(path, _parse_table, "alignment cache") or {}


def _add_to_cache(path: Path, rows: dict[str, np.ndarray]) -> None:
    merge_npz_cache(path, _read_cache, lambda table: table.update(rows),
                    lambda table: {"keys": np.array(list(table), dtype=str), "X": np.stack(list(table.values()))})


def grade_code(g: str) -> float:
    g = str(g).strip().upper()
    if g in ("KG", "K"):
        return 0.0
    return float(g) if g.isdigit() else math.nan


def category_codes(meta: pd.DataFrame, tasks: list[str]) -> np.ndarray:
    """[len(meta), 2]: the task's index among the training tasks and the grade (KG=0, 1, 2, 3);
    values never seen are missing (NaN)."""
    pos = {t: float(i) for i, t in enumerate(tasks)}
    return np.column_stack([[pos.get(str(t), math.nan) for t in meta["task"]],
                            [grade_code(g) for g in meta["grade"]]]).astype(np.float64)
