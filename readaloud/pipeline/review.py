"""A static review page of the test rows for the people who check the scores (`infer.py --report DIR`).

`DIR/index.html` opens from disk, with no server and no network: per submission row an audio player
(the clip referenced by its path relative to DIR, never embedded), the expected words coloured by
Whisper's probability of each with the least likely one marked, the transcript Whisper heard, the
ensemble's score and each member's, task and grade. Filters by task, grade and mark; sorting by
score, by how unsure the ensemble is, by how much its members disagree (and by log loss). With
`test_labels.csv` in the data folder: each row's label and log loss, and a summary at the top (log
loss per task and grade, reliability plots). A reviewer marks a row's response correct or wrong; the
marks are kept in the browser (localStorage) and downloaded as `corrections.csv` (filename,score, the
train_labels.csv format) for `preprocess.py --corrections FILE` (readaloud/corrections.py).

The words come from pipeline/explain.py (the ASR cache inference has filled, no second decode); the
members' scores from the `per_model` entry of the inference result ({member: probability per
submission row}) when it is there. The rows are embedded as one JSON block; the page's script
(review_page.js, inlined) renders them a page of 50 at a time, so 20,000 rows stay usable.
"""
from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import os
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from ..checkpoints import atomic_write
from ..data import LABEL_COLUMNS, META_COLUMNS, normalise_grade, read_csv
from ..metrics import clip_prob, log_loss

log = logging.getLogger("readaloud.infer")

PAGE_DIR = Path(__file__).resolve().parent
# the word colours, shared with the page's legend and the README: p >= GREEN_FROM green, p >= YELLOW_FROM yellow, else red
GREEN_FROM, YELLOW_FROM = 0.5, 0.1
RELIABILITY_BINS = 10


def word_colour(p: float | None) -> str:
    """The colour class of a word whose probability Whisper rates `p` (None: not known)."""
    if p is None or not math.isfinite(p):
        return "none"
    return "green" if p >= GREEN_FROM else "yellow" if p >= YELLOW_FROM else "red"


def audio_link(clip: Path, out_dir: Path) -> str:
    """The clip's path relative to the page's folder, as a URL (a clip on another drive: absolute)."""
    try:
        rel = os.path.relpath(clip.resolve(), out_dir.resolve())
    except ValueError:  # Windows: another drive has no relative path
        return clip.resolve().as_uri()
    return quote(Path(rel).as_posix())


def _read_table(path: Path, columns: list[str]) -> pd.DataFrame | None:
    """A CSV the page can do without: None (and a warning naming it) when it is absent or broken."""
    if not path.exists():
        return None
    try:
        return read_csv(path, columns)
    except Exception as exc:
        log.warning("report: %s left out (%s)", path, exc)
        return None


def test_labels(data_dir: Path) -> dict[str, int]:
    """{filename: 0 or 1} of test_labels.csv; rows whose score is not 0 or 1 are named and left out."""
    table = _read_table(data_dir / "test_labels.csv", LABEL_COLUMNS)
    if table is None:
        return {}
    labels, bad = {}, []
    for i, (name, score) in enumerate(zip(table["filename"], table["score"].str.strip())):
        if score in ("0", "1", "0.0", "1.0"):
            labels[name] = int(float(score))
        else:
            bad.append(f"row {i + 2}: {name} {score!r}")
    if bad:
        log.warning("report: %s: %d label(s) not 0 or 1 left out (%s)", data_dir / "test_labels.csv", len(bad),
                    "; ".join(bad[:5]))
    return labels


def member_scores(result: dict | None, n_rows: int) -> dict[str, list[float | None]]:
    """{member: probability per submission row (None: not predicted)} from the inference result's
    `per_model`; a member whose list does not match the submission is left out, with a warning."""
    per_model = (result or {}).get("per_model") or {}
    members = {}
    for name, values in sorted(per_model.items()):
        if not isinstance(values, (list, tuple)) or len(values) != n_rows:
            log.warning("report: member %s left out: %s values for %d submission rows", name,
                        len(values) if isinstance(values, (list, tuple)) else type(values).__name__, n_rows)
            continue
        members[name] = [_probability(v) for v in values]
    return members


def _probability(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _row_log_loss(y: int, p: float) -> float:
    q = float(clip_prob(p))
    return -math.log(q) if y == 1 else -math.log(1 - q)


def page_rows(data_dir: Path, out_dir: Path, submission: pd.DataFrame, explanations: list[dict] | None,
              members: dict[str, list[float | None]], labels: dict[str, int], fallback: dict[str, str]) -> list[dict]:
    """One compact record per submission row, in its order (the keys the page's script reads)."""
    meta = _read_table(data_dir / "test_metadata.csv", META_COLUMNS)
    info = {} if meta is None else {f: (t.strip(), normalise_grade(g), x.strip()) for f, t, g, x in
                                    zip(meta["filename"], meta["task"], meta["grade"], meta["expected_text"])}
    explained = {r["filename"]: r for r in explanations or []}
    rows = []
    for i, (name, score) in enumerate(zip(submission["filename"], submission["score"])):
        task, grade, text = info.get(name, ("", "", ""))
        record = explained.get(name, {})
        words = [[w["word"], w["p"]] for w in record.get("words", [])]
        notes = [n for n in (fallback.get(name) and f"prior, not a prediction: {fallback[name]}",
                             record.get("note")) if n]
        if name not in info:
            notes.append("no row in test_metadata.csv")
        row = {"i": i, "f": name, "a": audio_link(data_dir / name, out_dir), "t": task, "g": grade,
               "x": text or record.get("expected_text", ""), "w": words,
               "lo": record.get("least_likely_index"), "h": record.get("transcript", ""),
               "s": round(float(score), 5), "m": [None if v[i] is None else round(v[i], 5) for v in members.values()],
               "n": "; ".join(notes)}
        if name in labels:
            row["y"] = labels[name]
            row["ll"] = round(_row_log_loss(labels[name], float(score)), 5)
        rows.append(row)
    return rows


def reliability_svg(y: np.ndarray, p: np.ndarray, title: str, size: int = 110) -> str:
    """An inline SVG reliability plot: observed rate against mean score per bin of the score, a dot
    per non-empty bin (its area the bin's clip count), the diagonal for perfect calibration."""
    pad, inner = 22, size - 30
    def at(x, yv):
        return pad + x * inner, 8 + (1 - yv) * inner
    parts = [f'<svg class="reliability" xmlns="http://www.w3.org/2000/svg" width="{size + 20}" height="{size + 20}" '
             f'role="img" aria-label="reliability plot, {html.escape(title)}">',
             f'<rect x="{pad}" y="8" width="{inner}" height="{inner}" fill="#fff" stroke="#999"/>',
             '<line x1="{:.1f}" y1="{:.1f}" x2="{:.1f}" y2="{:.1f}" stroke="#bbb" stroke-dasharray="3,3"/>'.format(
                 *at(0, 0), *at(1, 1))]
    for v in (0, 0.5, 1):
        x0, y0 = at(v, 0)
        parts.append(f'<text x="{x0:.1f}" y="{y0 + 11:.1f}" font-size="9" text-anchor="middle">{v:g}</text>')
        x1, y1 = at(0, v)
        parts.append(f'<text x="{x1 - 3:.1f}" y="{y1 + 3:.1f}" font-size="9" text-anchor="end">{v:g}</text>')
    bins = np.minimum((p * RELIABILITY_BINS).astype(int), RELIABILITY_BINS - 1)
    top = max(np.bincount(bins, minlength=RELIABILITY_BINS).max(), 1) if len(p) else 1
    points = []
    for b in range(RELIABILITY_BINS):
        inside = bins == b
        n = int(inside.sum())
        if n:
            cx, cy = at(float(p[inside].mean()), float(y[inside].mean()))
            points.append((cx, cy))
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{2 + 5 * math.sqrt(n / top):.1f}" fill="#1f6fb2" '
                         f'fill-opacity="0.7"><title>scores {b / RELIABILITY_BINS:g}-{(b + 1) / RELIABILITY_BINS:g}: '
                         f'{n} clips, mean score {p[inside].mean():.3f}, observed {y[inside].mean():.3f}</title></circle>')
    if len(points) > 1:
        parts.append('<polyline fill="none" stroke="#1f6fb2" stroke-width="1" points="'
                     + " ".join(f"{x:.1f},{yv:.1f}" for x, yv in points) + '"/>')
    parts.append(f'<text x="{pad + inner / 2:.1f}" y="{size + 4}" font-size="9" text-anchor="middle">'
                 f'{html.escape(title)}</text><text x="{pad + inner / 2:.1f}" y="{size + 15}" font-size="9" '
                 f'text-anchor="middle">{len(p)} clips</text></svg>')
    return "".join(parts)


def summary_html(rows: list[dict], member_names: list[str], result: dict | None) -> str:
    """Log loss of the ensemble and each member, per task and per grade, with reliability plots
    (the labelled rows only); empty without labels."""
    labelled = [r for r in rows if "y" in r]
    if not labelled:
        return ""
    y = np.array([r["y"] for r in labelled], float)
    p = np.array([r["s"] for r in labelled], float)
    head = [f"<p>{len(labelled)} of {len(rows)} rows have a label in test_labels.csv. Log loss: "
            f"<b>ensemble {log_loss(y, p):.4f}</b>"]
    if result and "test_logloss_prior" in result:
        head.append(f", task prior {float(result['test_logloss_prior']):.4f}")
    for k, name in enumerate(member_names):
        have = [(r["y"], r["m"][k]) for r in labelled if r["m"][k] is not None]
        if have:
            my, mp = map(np.array, zip(*have))
            head.append(f", {html.escape(name)} {log_loss(my, mp):.4f}")
    head.append(".</p>")
    tables, plots = [], [reliability_svg(y, p, "all rows")]
    for column, key in (("task", "t"), ("grade", "g")):
        groups = sorted({r[key] for r in labelled})
        lines = [f'<table class="groups"><thead><tr><th>{column}</th><th>clips</th><th>share correct</th>'
                 f'<th>mean score</th><th>accuracy at 0.5</th><th>log loss</th></tr></thead><tbody>']
        for value in groups:
            gy = np.array([r["y"] for r in labelled if r[key] == value], float)
            gp = np.array([r["s"] for r in labelled if r[key] == value], float)
            lines.append(f"<tr><td>{html.escape(value or '(none)')}</td><td>{len(gy)}</td><td>{gy.mean():.3f}</td>"
                         f"<td>{gp.mean():.3f}</td><td>{((gp >= 0.5) == (gy == 1)).mean():.3f}</td>"
                         f"<td>{log_loss(gy, gp):.4f}</td></tr>")
            plots.append(reliability_svg(gy, gp, f"{column} {value or '(none)'}"))
        lines.append("</tbody></table>")
        tables.append("".join(lines))
    return ('<details id="summary" open><summary><h2>Summary</h2></summary>' + "".join(head) + '<div class="tables">' + "".join(tables)
            + '</div><p class="hint">Reliability: observed share of correct responses against the mean score, per '
            'tenth of the score; on the dashed diagonal the scores are calibrated, a dot\'s area is its clip '
            'count.</p><div class="plots">' + "".join(plots) + "</div></details>")


def storage_key(rows: list[dict]) -> str:
    """The browser's key for this test set's marks: the same rows give the same key, so marks
    survive a rebuilt page and never mix with another set's."""
    digest = hashlib.sha1("\n".join(r["f"] for r in rows).encode()).hexdigest()[:16]
    return f"readaloud-review:{digest}"


def _script_json(value) -> str:
    """JSON that is safe inside a <script> element."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).replace("</", "<\\/").replace("<!--", "<\\!--")


def render_page(rows: list[dict], member_names: list[str], title: str, facts: dict, summary: str) -> str:
    legend = (f'<span class="w green">green</span> Whisper finds the word likely (p &ge; {GREEN_FROM:g}) '
              f'<span class="w yellow">yellow</span> unsure ({YELLOW_FROM:g} &le; p &lt; {GREEN_FROM:g}) '
              f'<span class="w red">red</span> unlikely (p &lt; {YELLOW_FROM:g}) '
              '<span class="w yellow least">underlined</span> the least likely word of the row; '
              'the number under a word is its probability.')
    data = {"members": member_names, "storageKey": storage_key(rows), "greenFrom": GREEN_FROM,
            "yellowFrom": YELLOW_FROM, "rows": rows}
    css = (PAGE_DIR / "review_page.css").read_text()
    js = (PAGE_DIR / "review_page.js").read_text()
    facts_html = " &middot; ".join(f"{html.escape(k)}: <code>{html.escape(str(v))}</code>" for k, v in facts.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{css}</style></head>
<body>
<header><h1>{html.escape(title)}</h1><p class="facts">{facts_html}</p>
<p class="legend">{legend}</p></header>
{summary}
<section id="controls">
<label>task <select id="filter-task"><option value="">all</option></select></label>
<label>grade <select id="filter-grade"><option value="">all</option></select></label>
<label>marks <select id="filter-mark"><option value="">all rows</option><option value="marked">marked</option>
<option value="unmarked">not marked</option><option value="disagree">marked against the score</option></select></label>
<label>find <input id="filter-text" type="search" placeholder="filename or word"></label>
<label>sort <select id="sort"><option value="order">submission order</option>
<option value="score-asc">score, lowest first</option><option value="score-desc">score, highest first</option>
<option value="unsure">most unsure first (score nearest 0.5)</option>
<option value="disagree">members disagree most first</option>
<option value="logloss">log loss, worst first</option></select></label>
</section>
<section id="marks-bar"><span id="mark-count"></span>
<button id="download" type="button">Download corrections.csv</button>
<button id="clear-marks" type="button">Clear all marks</button>
<span class="hint">Marks stay in this browser; the CSV (filename,score) goes to
<code>preprocess.py --corrections corrections.csv</code>, then <code>train.py --force</code>.</span></section>
<nav class="pager" id="pager-top"></nav>
<main id="rows"></main>
<nav class="pager" id="pager-bottom"></nav>
<script type="application/json" id="review-data">{_script_json(data)}</script>
<script>{js}</script>
</body></html>
"""


def write_review(data_dir: str | Path, assets_dir: str | Path, out_dir: str | Path, submission: str | Path,
                 result: dict | None = None, device: str = "auto", explanations: list[dict] | None = None,
                 progress: bool = True) -> dict:
    """Write `out_dir/index.html` for the rows of `submission` (a written submission.csv). The words
    are `explanations` (explain.explain_rows' records) or computed here from the ASR cache; without
    them (they failed) the page shows the scores and says why. Returns what was written."""
    t0 = time.time()
    data_dir, out_dir, submission = Path(data_dir), Path(out_dir), Path(submission)
    sub = pd.read_csv(submission, dtype={"filename": str}, keep_default_na=False)
    missing = [c for c in LABEL_COLUMNS if c not in sub.columns]
    if missing:
        raise ValueError(f"{submission}: missing column(s) {missing}; found {list(sub.columns)}")
    backbone, explain_problem = None, ""
    if explanations is None:
        try:
            from .explain import evidence_label, explain_backbone, explain_rows
            backbone = explain_backbone(assets_dir)
            explanations = explain_rows(data_dir, backbone, dict(zip(sub["filename"], sub["score"])), device,
                                        progress)
            backbone = evidence_label(backbone)
        except Exception as exc:  # the page still shows every score
            explain_problem = f"{type(exc).__name__}: {exc}"
            log.warning("report: no word evidence (%s); the page shows the scores only", explain_problem)
            explanations, backbone = [], None
    backbone = backbone or next((r.get("backbone") for r in explanations if r.get("backbone")), None)
    members = member_scores(result, len(sub))
    if not members:
        log.info("report: no per-member scores in the inference result; the page shows the ensemble's")
    labels = test_labels(data_dir)
    fallback = (result or {}).get("fallback") or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = page_rows(data_dir, out_dir, sub, explanations, members, labels, fallback)
    facts = {"rows": len(rows), "submission": submission, "data": data_dir,
             "word evidence": f"none ({explain_problem})" if explain_problem else backbone or "none",
             "members": ", ".join(members) or "ensemble only", "written": time.strftime("%Y-%m-%d %H:%M")}
    page = render_page(rows, list(members), "readaloud review: " + submission.name, facts,
                       summary_html(rows, list(members), result))
    index = out_dir / "index.html"
    atomic_write(index, page)
    explained = sum(bool(r["w"]) for r in rows)
    log.info("report: %d rows (%d with word evidence, %d labelled, members: %s) -> %s in %.1fs", len(rows), explained,
             sum("y" in r for r in rows), ", ".join(members) or "ensemble only", index, time.time() - t0)
    return {"report": str(index), "rows": len(rows), "explained": explained, "labelled": sum("y" in r for r in rows),
            "members": list(members), "backbone": backbone}
