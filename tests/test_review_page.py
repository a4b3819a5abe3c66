"""infer.py --report DIR: the review page, checked in a real browser, and its corrections fed back
into training (preprocess.py --corrections).

A tiny demo set (16 training, 8 test clips, 2 folds) trains model5gbm and model6asr (Whisper tiny.en
only); infer.py writes the submission, the explanations (JSONL) and the page. Headless Chromium
(driven over the DevTools protocol, tests/chromium_cdp.py) opens DIR/index.html from disk and checks
the rows, their audio (the relative path loads the clip), the word colours against the
explanations, a filter, the sorts, the members' scores, and that marks survive a reload and come out
of the download button as corrections.csv. That CSV then goes through preprocess.py --corrections
into a copy of the data folder, and train.py trains on the corrected labels."""
import argparse
import json
import math
import re
import shutil
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd
import pytest

from conftest import run_script
from readaloud.pipeline import review

CHROMIUM = Path("/usr/bin/chromium")
BACKBONE = "whisper-tiny.en"
GBM_OPTIONS = ["--asr_backbones", BACKBONE, "--gbm_min_samples_leaf", "2", "--gbm_ear_copies", "1", "--asr_fold_ears", "false"]
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (apt-get install "
                                    "chromium chromium-driver; .ci/run installs it)")


@pytest.fixture(scope="module")
def run(tmp_path_factory, root):
    """The tiny run: data, preprocess, two members x two folds, weights, infer.py --explain --report."""
    base = tmp_path_factory.mktemp("review")
    data, assets, tts = base / "data", base / "assets", base / "tts"
    run_script(root, "make_demo_data.py", "--out", data, "--n-train", 16, "--n-test", 8, "--seed", 3)
    run_script(root, "preprocess.py", "--data", data, "--tts_dir", tts, "--n_folds", 2, "--workers", 1)
    run_script(root, "train.py", "--data", data, "--assets", assets, "--tts_dir", tts, "--n_folds", 2,
               "--models", "model5gbm,model6asr", "--jobs", 2, *GBM_OPTIONS)
    run_script(root, "get_config.py", "--assets", assets)
    out, page_dir = base / "sub.csv", base / "review"
    res = run_script(root, "infer.py", "--data", data, "--assets", assets, "--tts_dir", tts, "--out", out,
                     "--no_progress", "--explain", base / "explain.jsonl", "--report", page_dir)
    return {"root": root, "data": data, "assets": assets, "tts": tts, "base": base, "out": out, "page": page_dir,
            "stdout": res.stdout + res.stderr, "result": json.loads(Path(f"{out}.json").read_text()),
            "explain": [json.loads(line) for line in (base / "explain.jsonl").read_text().splitlines()]}


def page_data(index: Path) -> dict:
    """The JSON block the page renders from."""
    match = re.search(r'<script type="application/json" id="review-data">(.*?)</script>', index.read_text(), re.S)
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def members_page(run):
    """The page with each member's scores: infer.py's own when its result carries `per_model`, else
    one built from the same result plus each member's probabilities (the ensemble's prediction
    with that member alone)."""
    if run["result"].get("per_model"):
        return run["page"] / "index.html", run["result"]["per_model"]
    from readaloud.pipeline.inference import run_inference
    config = json.loads((run["assets"] / "model_configs.json").read_text())
    per_model = {}
    for member in config["members"]:
        alone = {**config, "members": [{**member, "weight": 1.0}], "bias": 0.0}
        out = run["base"] / f"alone_{member['model']}.csv"
        run_inference(run["data"], run["assets"], run["tts"], out, "cpu", progress=False, config=alone)
        per_model[member["model"]] = pd.read_csv(out, dtype={"filename": str})["score"].tolist()
    records = run["explain"]
    done = review.write_review(run["data"], run["assets"], run["base"] / "review_members", run["out"],
                               {**run["result"], "per_model": per_model}, "cpu", explanations=records, progress=False)
    return Path(done["report"]), per_model


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium chromium-driver; .ci/run installs it)")
    from chromium_cdp import Chromium
    with Chromium() as chromium:
        yield chromium


def click(browser, selector: str) -> None:
    browser.evaluate(f"document.querySelector({json.dumps(selector)}).click()")


def choose(browser, select_id: str, value: str) -> None:
    browser.evaluate(f"(() => {{ const s = document.getElementById({json.dumps(select_id)}); s.value = "
                     f"{json.dumps(value)}; s.dispatchEvent(new Event('change')); }})()")


def shown(browser, field: str = "filename") -> list[str]:
    return browser.evaluate(f"[...document.querySelectorAll('article.row')].map(e => e.dataset.{field})")


@pytest.fixture(scope="module")
def marked(run, browser, tmp_path_factory):
    """The reviewer's session on infer.py's page: two rows marked, the page reloaded, the CSV
    downloaded with the button."""
    downloads = tmp_path_factory.mktemp("downloads")
    index = run["page"] / "index.html"
    browser.navigate(index.as_uri())
    browser.evaluate("localStorage.clear()")
    browser.reload()
    names = shown(browser)
    wrong, right = names[0], names[1]
    click(browser, f'article.row[data-filename="{wrong}"] button.mark-0')
    click(browser, f'article.row[data-filename="{right}"] button.mark-1')
    browser.reload()  # the marks live in localStorage, not in the page
    after_reload = browser.evaluate("correctionsCsv()")
    classes = browser.evaluate(f'document.querySelector(\'article.row[data-filename="{wrong}"]\').className')
    browser.allow_downloads(downloads)
    mark = len(browser.events)
    click(browser, "#download")
    browser.wait_for_event("Browser.downloadProgress", since=mark, state="completed")
    return {"wrong": wrong, "right": right, "csv": after_reload, "classes": classes,
            "file": downloads / "corrections.csv", "errors": browser.console_errors()}


def test_infer_writes_the_page_after_the_submission(run):
    sub = pd.read_csv(run["out"], dtype={"filename": str})
    fmt = pd.read_csv(run["data"] / "submission_format.csv", dtype={"filename": str})
    assert sub["filename"].tolist() == fmt["filename"].tolist() and sub["score"].between(0, 1).all()
    assert f"wrote {run['page'] / 'index.html'}: 8 rows, 8 with word probabilities ({BACKBONE}), 8 labelled" \
        in run["stdout"]
    data = page_data(run["page"] / "index.html")
    assert [r["f"] for r in data["rows"]] == fmt["filename"].tolist(), "one row per submission row, in order"
    assert [r["s"] for r in data["rows"]] == pytest.approx(sub["score"].tolist(), abs=1e-5)
    explained = {r["filename"]: r for r in run["explain"]}
    labels = pd.read_csv(run["data"] / "test_labels.csv", dtype={"filename": str}).set_index("filename")["score"]
    meta = pd.read_csv(run["data"] / "test_metadata.csv", dtype=str).set_index("filename")
    for row in data["rows"]:
        record = explained[row["f"]]
        assert row["w"] == [[w["word"], w["p"]] for w in record["words"]], "the explanations' words, not recomputed"
        assert row["lo"] == record["least_likely_index"] and row["h"] == record["transcript"]
        assert (row["t"], row["g"]) == (meta.loc[row["f"], "task"], meta.loc[row["f"], "grade"])
        assert row["y"] == labels[row["f"]]
        # the row's log loss from the submission's own score (the page shows the score rounded to 5 decimals,
        # which near 0 or 1 moves -log p by more than the log loss's own rounding)
        score = float(sub.set_index("filename").loc[row["f"], "score"])
        p = min(max(score, 1e-15), 1 - 1e-15)
        assert row["ll"] == pytest.approx(-math.log(p if row["y"] == 1 else 1 - p), abs=1e-4)
        clip = (run["page"] / unquote(row["a"])).resolve()
        assert not Path(unquote(row["a"])).is_absolute() and clip == (run["data"] / row["f"]).resolve()
    html = (run["page"] / "index.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html, \
        "nothing fetched from the network"
    assert "<audio" not in html.split('id="review-data"')[0] and ".wav" not in html.split("<script")[0], \
        "no clip embedded in the page itself"
    assert html.count('class="reliability"') == 1 + len(set(meta["task"])) + len(set(meta["grade"]))


@needs_chromium
def test_the_page_in_a_browser(run, browser, marked):
    assert marked["errors"] == [], "no script error in the page"
    rows = browser.evaluate("document.querySelectorAll('article.row').length")
    audios = browser.evaluate("[...document.querySelectorAll('article.row audio')].map(a => a.src)")
    assert rows == 8 and len(audios) == 8, "a row and an audio player per test clip"
    data = {r["f"]: r for r in page_data(run["page"] / "index.html")["rows"]}
    for name, src in zip(shown(browser), audios):
        assert Path(unquote(urlparse(src).path)).resolve() == (run["data"] / name).resolve()
    duration = browser.evaluate("""(async () => {
        const a = document.querySelector('article.row audio'); a.preload = 'auto'; a.load();
        await new Promise((done, fail) => { a.onloadedmetadata = done;
            a.onerror = () => fail(new Error('audio error ' + (a.error && a.error.code)));
            setTimeout(() => fail(new Error('no audio metadata in 15 s')), 15000); });
        return a.duration; })()""")
    assert duration > 0.2, "the clip plays from its relative path"
    words = browser.evaluate("""[...document.querySelectorAll('article.row')].map(row => [row.dataset.filename,
        [...row.querySelectorAll('.words .w')].map(w => [w.firstChild.textContent, w.className,
         getComputedStyle(w).backgroundColor])])""")
    colours = {"green": "rgb(201, 236, 209)", "yellow": "rgb(251, 232, 166)", "red": "rgb(246, 193, 187)"}
    seen = set()
    for name, spans in words:
        row = data[name]
        assert [s[0] for s in spans] == [w for w, _ in row["w"]]
        for k, (word, cls, background) in enumerate(spans):
            colour = review.word_colour(row["w"][k][1])
            assert colour in cls.split() and background == colours[colour], (name, word, cls)
            assert ("least" in cls.split()) == (k == row["lo"]), "the least likely word, and it alone, is marked"
            seen.add(colour)
    assert seen, "some word is coloured"
    task = browser.evaluate("document.querySelector('article.row .tag.task').textContent")
    choose(browser, "filter-task", task)
    assert set(browser.evaluate("[...document.querySelectorAll('article.row .tag.task')].map(e => e.textContent)")) \
        == {task} and len(shown(browser)) == sum(r["t"] == task for r in data.values())
    choose(browser, "filter-task", "")
    choose(browser, "sort", "unsure")
    order = [abs(data[n]["s"] - 0.5) for n in shown(browser)]
    assert order == sorted(order), "most unsure first"
    choose(browser, "sort", "logloss")
    worst = [data[n]["ll"] for n in shown(browser)]
    assert worst == sorted(worst, reverse=True)
    choose(browser, "filter-mark", "marked")
    assert sorted(shown(browser)) == sorted([marked["wrong"], marked["right"]])
    choose(browser, "filter-mark", "")
    choose(browser, "sort", "order")
    browser.screenshot(run["base"] / "review.png")
    assert (run["base"] / "review.png").stat().st_size > 10_000


@needs_chromium
def test_marks_survive_a_reload_and_download_as_train_labels(marked):
    expected = f"filename,score\n{marked['wrong']},0\n{marked['right']},1\n"
    expected_lines = sorted(expected.splitlines()[1:])
    assert marked["csv"].splitlines()[0] == "filename,score" and sorted(marked["csv"].splitlines()[1:]) == expected_lines
    assert "marked-0" in marked["classes"], "the mark is shown after the reload"
    assert marked["file"].read_text() == marked["csv"], "the button downloads what correctionsCsv() gives"


@needs_chromium
def test_each_members_score_and_their_disagreement(browser, members_page, run):
    index, per_model = members_page
    browser.navigate(index.as_uri())
    names = shown(browser)
    order = pd.read_csv(run["out"], dtype={"filename": str})["filename"].tolist()
    texts = browser.evaluate("""[...document.querySelectorAll('article.row')].map(row =>
        [...row.querySelectorAll('.member')].map(m => [m.dataset.member, m.textContent]))""")
    for name, members in zip(names, texts):
        i = order.index(name)
        assert [m for m, _ in members] == sorted(per_model)
        for member, text in members:
            assert text.strip() == f"{member} {per_model[member][i]:.3f}"
    choose(browser, "sort", "disagree")
    spread = [max(per_model[m][order.index(n)] for m in per_model) - min(per_model[m][order.index(n)] for m in per_model)
              for n in shown(browser)]
    assert spread == sorted(spread, reverse=True), "members disagreeing most first"
    assert browser.console_errors() == []


@needs_chromium
def test_twenty_thousand_rows_stay_usable(browser, tmp_path):
    """A page of 20,000 rows renders 50 at a time and filters and pages in the browser."""
    rows = [{"i": i, "f": f"clip_{i:05d}.wav", "a": f"../data/clip_{i:05d}.wav", "t": ("deletion", "blending")[i % 2],
             "g": ("KG", "1", "2", "3")[i % 4], "x": "the cat sat", "w": [["the", 0.9], ["cat", 0.3], ["sat", 0.01]],
             "lo": 2, "h": "the cat", "s": (i % 997) / 997, "m": [], "n": ""} for i in range(20_000)]
    page = tmp_path / "index.html"
    page.write_text(review.render_page(rows, [], "big", {"rows": len(rows)}, ""))
    assert page.stat().st_size < 5_000_000, "the rows are compact"
    t0 = time.time()
    browser.navigate(page.as_uri())
    loaded = time.time() - t0
    assert browser.evaluate("document.querySelectorAll('article.row').length") == 50
    assert browser.evaluate("document.querySelectorAll('audio').length") == 50, "players for the page shown only"
    assert "of 20000" in browser.evaluate("document.querySelector('#pager-top .where').textContent")
    click(browser, "#pager-top .next")
    assert shown(browser)[0] == "clip_00050.wav"
    choose(browser, "filter-grade", "3")
    assert browser.evaluate("window.review.shown().length") == 5000 and shown(browser)[0] == "clip_00003.wav"
    assert loaded < 30, f"the page took {loaded:.1f}s to load"
    assert browser.console_errors() == []


@pytest.fixture(scope="module")
def reviewed(run, request):
    """The reviewer's corrections: the CSV the browser downloaded; without Chromium, the same rows
    (the first test row wrong, the second correct) in the same format."""
    if CHROMIUM.exists():
        marked = request.getfixturevalue("marked")
        return {"wrong": marked["wrong"], "right": marked["right"], "csv": marked["file"].read_text()}
    names = pd.read_csv(run["out"], dtype={"filename": str})["filename"].tolist()
    return {"wrong": names[0], "right": names[1], "csv": f"filename,score\n{names[0]},0\n{names[1]},1\n"}


def test_corrections_round_trip_into_training(run, reviewed, tmp_path, root):
    """The downloaded corrections.csv (plus a training clip's label flipped, as a reviewer of
    training clips would) goes through preprocess.py --corrections into a copy of the data folder;
    train.py then trains on the corrected labels."""
    marked = reviewed
    data = tmp_path / "data"
    shutil.copytree(run["data"], data)
    train_labels = pd.read_csv(data / "train_labels.csv", dtype={"filename": str})
    flipped, old = train_labels["filename"].iloc[0], int(train_labels["score"].iloc[0])
    corrections = tmp_path / "corrections.csv"
    corrections.write_text(marked["csv"] + f"{flipped},{1 - old}\n")
    out = run_script(root, "preprocess.py", "--data", data, "--tts_dir", run["tts"], "--n_folds", 2,
                     "--workers", 1, "--corrections", corrections).stdout
    assert "1 training label(s) corrected, 2 test clip(s) added to training, 0 already as given" in out
    assert f"corrected {flipped}: {old} -> {1 - old}" in out and f"added {marked['wrong']}: score 0" in out
    assert "train.py" in out and "--force" in out
    from readaloud.data import load_split
    train = load_split(data, "train").meta.set_index("filename")
    test = pd.read_csv(data / "test_metadata.csv", dtype=str).set_index("filename")
    assert train.loc[flipped, "score"] == 1 - old
    assert train.loc[marked["wrong"], "score"] == 0 and train.loc[marked["right"], "score"] == 1
    assert train.loc[marked["wrong"], "expected_text"] == test.loc[marked["wrong"], "expected_text"]
    assert len(train) == len(train_labels) + 2
    log = pd.read_csv(data / "corrections_log.csv", dtype=str)
    assert sorted(log["action"]) == ["added from test", "added from test", "corrected"]
    assert (data / "train_labels.before_corrections.csv").read_text() == (run["data"] / "train_labels.csv").read_text()
    folds = pd.read_csv(data / "cache" / "folds_2.csv", dtype={"filename": str})
    before = pd.read_csv(run["data"] / "cache" / "folds_2.csv", dtype={"filename": str})
    assert folds.iloc[:len(before)].equals(before), "every clip keeps its fold"
    assert set(folds["filename"]) == set(train.index)
    again = run_script(root, "preprocess.py", "--data", data, "--tts_dir", run["tts"], "--n_folds", 2,
                       "--workers", 1, "--corrections", corrections).stdout
    assert "0 training label(s) corrected, 0 test clip(s) added to training, 3 already as given" in again
    assets = tmp_path / "assets"
    run_script(root, "train.py", "--data", data, "--assets", assets, "--tts_dir", run["tts"], "--n_folds", 2,
               "--models", "model5gbm", "--jobs", 2, "--gbm_min_samples_leaf", "2")
    oof = pd.concat([pd.read_csv(assets / f"model5gbm_{k}_oof.csv", dtype={"filename": str}) for k in (0, 1)])
    oof = oof.set_index("filename")["score"]
    assert oof[flipped] == 1 - old and oof[marked["wrong"]] == 0 and oof[marked["right"]] == 1, \
        "the folds trained and validated on the corrected labels"


def test_bad_corrections_are_refused_by_line(run, tmp_path, root):
    data = tmp_path / "data"
    shutil.copytree(run["data"], data, ignore=shutil.ignore_patterns("*.wav", "cache"))
    bad = tmp_path / "bad.csv"
    first_test = pd.read_csv(data / "test_metadata.csv", dtype=str)["filename"].iloc[0]
    bad.write_text(f"filename,score\nnot_a_clip.wav,1\n{first_test},2\n")
    from readaloud.corrections import apply_corrections
    from readaloud.data import DataError
    with pytest.raises(DataError, match=rf"line 3: {re.escape(first_test)} '2'"):
        apply_corrections(data, bad)
    bad.write_text("filename,score\nnot_a_clip.wav,1\n")
    with pytest.raises(DataError, match=r"line 2: 'not_a_clip.wav'"):
        apply_corrections(data, bad)
    bad.write_text(f"filename,score\n{first_test},1\n{first_test},0\n")
    with pytest.raises(DataError, match="both 0 and 1"):
        apply_corrections(data, bad)
    assert (data / "train_labels.csv").read_text() == (run["data"] / "train_labels.csv").read_text(), "nothing written"
    proc = run_script(root, "preprocess.py", "--data", data, "--corrections", bad, ok=False)
    assert proc.returncode != 0 and "preprocess.py --corrections" in proc.stderr and "both 0 and 1" in proc.stderr


def test_a_report_failure_never_costs_the_submission(run, tmp_path, caplog):
    import infer
    sub = tmp_path / "s.csv"
    shutil.copy(run["out"], sub)
    before = sub.read_bytes()
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    args = argparse.Namespace(data=str(run["data"]), assets=str(run["assets"]), out=str(sub), report=str(blocked),
                              device="cpu", no_progress=True)
    with caplog.at_level("ERROR"):
        infer.report(args, run["result"])  # logs, never raises
    assert "--report failed" in caplog.text and sub.read_bytes() == before


def test_a_broken_explanation_leaves_a_page_of_scores(run, tmp_path, monkeypatch, caplog):
    from readaloud.pipeline import explain

    def broken(*args, **kwargs):
        raise RuntimeError("the ASR cache is unreadable")
    monkeypatch.setattr(explain, "explain_rows", broken)
    with caplog.at_level("WARNING"):
        done = review.write_review(run["data"], run["assets"], tmp_path / "page", run["out"],
                                   {**run["result"], "per_model": {"short": [0.5]}}, "cpu", progress=False)
    assert done["explained"] == 0 and done["rows"] == 8 and done["members"] == []
    assert "the ASR cache is unreadable" in caplog.text and "member short left out: 1 values for 8" in caplog.text
    data = page_data(tmp_path / "page" / "index.html")
    assert all(r["w"] == [] and r["x"] for r in data["rows"]), "the expected text without probabilities"
    assert "RuntimeError: the ASR cache is unreadable" in (tmp_path / "page" / "index.html").read_text()


def test_word_colours_and_links():
    assert [review.word_colour(p) for p in (0.9, 0.5, 0.49, 0.1, 0.09, 0.0, None, float("nan"))] == \
        ["green", "green", "yellow", "yellow", "red", "red", "none", "none"]
    assert review.audio_link(Path("/a/data/x y.wav"), Path("/a/out/review")) == "../../data/x%20y.wav"
    assert "<\\/script>" in review._script_json({"x": "</script>"})
