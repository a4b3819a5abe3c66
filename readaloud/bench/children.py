"""Children reading aloud: the quality benchmark on real children, held out by speaker.

    python -m readaloud.bench.children --out DIR [--source ../shared/data/speechocean_kids]
        [--test-speakers 8] [--seed 0] [--train_seed N] [--fold_seed N] [--extra-train SOURCE ...]
        [--models a,b] [--n_folds 4] [any quality/train option...]
    python -m readaloud.bench.children --retrain RUN --out OTHER --models model6asr [its options...]

Builds a `sentence_repetition` screening set from children reading sentences (the source
folder's utterances.csv and audio) with ../shared/bench/read_aloud_set.py (`--both`: every test
clip once with its own sentence, once changed) into DIR/data, then runs readaloud.bench.quality
on it with folds grouped by child (`--groups DIR/data/speakers.csv`), so no child is both in a
fold's training part and in its scored part, and no test child anywhere in training. Options
this command does not know go to the quality benchmark (and from there to train.py) unchanged.

Writes DIR/children.md and children.json: for the prior, each member and the ensemble, test log
loss, AUC, log loss per grade and per change type (own, swap, drop, add, other), and the fold
training time; then, out of fold on the training children and on the test children, the figures
by child: log loss of the correct readings, the median and the worst child, and the children
scored worse than the base rate on their own clips; reliability.png and changes.png beside them. A rerun reuses the set and every
finished fold.

`--retrain RUN`: how one option moves a finished run's figures. The members named by `--models` are
trained again with the options given (a member the run lacks is trained and joins the blend), on RUN's
data folder and references (nothing is rebuilt, and its caches are reused); every other member of RUN's
ensemble keeps its folds (linked from RUN/assets, so train.py skips them) and is blended again with the
retrained ones. The report goes to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import quality

ROOT = Path(__file__).resolve().parents[2]
SHARED_CANDIDATES = (ROOT.parent / "shared", Path.cwd().parent / "shared")  # beside the repo, or the caller's
CHANGES = ("own", "swap", "drop", "add", "other")


def shared_path(relative: str) -> Path:
    """`relative` under the first shared folder that has it (else under the one beside the repo)."""
    return next((c / relative for c in SHARED_CANDIDATES if (c / relative).exists()),
                SHARED_CANDIDATES[0] / relative)


def build_set(builder: Path, source: Path, data: Path, test_speakers: int, seed: int,
              extra_train: list[Path] = ()) -> Path:
    """The screening set in `data`, built once per recipe (a different recipe in the same folder is an error).
    `extra_train`: other speakers' folders added to the training half only (the builder's --extra-train)."""
    recipe = {"builder": str(builder), "source": str(source), "test_speakers": test_speakers, "seed": seed,
              "both": True, "extra_train": [str(p) for p in extra_train]}
    recipe_path = data / "bench_recipe.json"
    compared = ("test_speakers", "seed", "both", "extra_train")
    if (data / "speakers.csv").exists() and recipe_path.exists():
        built = json.loads(recipe_path.read_text())
        if {k: built.get(k, [] if k == "extra_train" else None) for k in compared} != {k: recipe[k] for k in compared}:
            raise SystemExit(f"{data} was built with {built}, not {recipe}: use another --out")
        return data
    if not builder.is_file():
        raise SystemExit(f"data set builder {builder} not found (pass --builder)")
    if not (source / "utterances.csv").is_file():
        raise SystemExit(f"{source}/utterances.csv not found: --source must be a folder of children's "
                         f"utterances (utt,speaker,age,gender,text) and their audio")
    cmd = [sys.executable, str(builder), str(source), "--out", str(data), "--test-speakers", str(test_speakers),
           "--both", "--seed", str(seed), *(["--extra-train", *map(str, extra_train)] if extra_train else [])]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    recipe_path.write_text(json.dumps(recipe, indent=1))
    return data


def keep_members(run_assets: Path, assets: Path, retrained: set[str]) -> list[str]:
    """The finished folds of a run's ensemble members other than `retrained`, linked (copied across
    file systems) from `run_assets` into `assets` with their run folders, and the ears the run published
    (fold_ears.publish), so that train.py skips them; their names, in the run's order. A file lands under
    a temporary name first, so a copy cut short is never taken for a finished fold. A run without an
    ensemble config (get_config.py never ran) is an error."""
    import shutil
    from readaloud.layout import saved_folds
    from readaloud.members.gbm.fold_ears import publish
    from readaloud.pipeline.ensemble import read_config

    def link(src, dst):
        tmp = Path(dst).with_name(f".{Path(dst).name}.tmp{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)

    try:
        members = [m["model"] for m in read_config(run_assets)["members"]]
    except FileNotFoundError as exc:
        raise SystemExit(f"--retrain: {exc} (the run never finished)") from exc
    kept = [m for m in members if m not in retrained]
    assets.mkdir(parents=True, exist_ok=True)
    for paths in saved_folds(run_assets):
        if paths.variant not in kept:
            continue
        for f in (paths.checkpoint, paths.oof, paths.summary):
            if f.is_file() and not (assets / f.name).exists():
                link(f, assets / f.name)
        if paths.run_dir.is_dir() and not (assets / "runs" / paths.stem).exists():
            shutil.copytree(paths.run_dir, assets / "runs" / paths.stem, copy_function=link)
    if kept and (run_assets / "ears").is_dir():   # a kept model6asr reads the test rows with its published ear
        for ear in (run_assets / "ears").iterdir():
            if ear.is_dir():
                publish(ear, assets)
    return kept


def test_table(data: Path) -> pd.DataFrame:
    """Test clips in submission order with score, grade, speaker and change type."""
    fmt = pd.read_csv(data / "submission_format.csv", dtype=str)[["filename"]]
    meta = pd.read_csv(data / "test_metadata.csv", dtype=str)
    labels = pd.read_csv(data / "test_labels.csv", dtype={"filename": str})
    speakers = pd.read_csv(data / "speakers.csv", dtype=str)
    table = fmt.merge(meta, on="filename", how="left").merge(labels, on="filename", how="left")
    table = table.merge(speakers, on="filename", how="left")
    unnamed = table[table["speaker"].isna() | table["change"].isna()]
    if len(unnamed):
        raise ValueError(f"{data / 'speakers.csv'} has no speaker or change for test clip "
                         f"{unnamed['filename'].iloc[0]}")
    return table


def held_out_check(data: Path) -> dict:
    """Training and test children, which must not overlap (else the benchmark measures heard voices)."""
    speakers = pd.read_csv(data / "speakers.csv", dtype=str).set_index("filename")["speaker"]
    train = set(speakers.reindex(pd.read_csv(data / "train_metadata.csv", dtype=str)["filename"]))
    test = set(speakers.reindex(pd.read_csv(data / "test_metadata.csv", dtype=str)["filename"]))
    both = sorted(train & test)
    if both:
        raise ValueError(f"{data}: children in both training and test: {both[:5]}")
    return {"train": sorted(train), "test": sorted(test)}


def fold_seconds(assets: Path) -> dict[str, dict]:
    """Per variant: its finished folds and their training seconds (from the fold summaries)."""
    from readaloud.layout import saved_folds
    out: dict[str, dict] = {}
    for paths in saved_folds(assets):
        summary = paths.read_summary() or {}
        entry = out.setdefault(paths.variant, {"folds": 0, "seconds": 0.0, "max_fold_seconds": 0.0})
        entry["folds"] += 1
        entry["seconds"] += float(summary.get("seconds", float("nan")))
        entry["max_fold_seconds"] = max(entry["max_fold_seconds"], float(summary.get("seconds", float("nan"))))
    return out


def predictor_report(table: pd.DataFrame, pred: np.ndarray) -> dict:
    """Overall scores, and scores per grade and per change type, of one predictor's test predictions."""
    y = table["score"].to_numpy(float)
    return {**quality.scores(y, pred), "grade": quality.metrics_by(y, pred, table["grade"]),
            "change": quality.metrics_by(y, pred, table["change"])}


def children_report(data: Path, summary: dict, children: set[str] | None = None) -> dict:
    """Every predictor of a quality run scored on the test children, with training times and checks."""
    from readaloud.data import load_split
    from readaloud.pipeline.ensemble import read_config
    table = test_table(data)
    train_meta = load_split(data, "train", check_audio=False).meta
    preds = {"prior (base rate)": np.full(len(table), train_meta["score"].mean())}
    for name, path in summary["predictions"].items():
        sub = pd.read_csv(path, dtype={"filename": str})
        if list(sub["filename"]) != list(table["filename"]):
            raise ValueError(f"{path} does not list the test clips in submission order")
        preds[name] = sub["score"].to_numpy(float)
    assets = Path(summary["assets"])
    config = read_config(assets)
    seconds = fold_seconds(assets)
    seconds["ensemble"] = {"folds": sum(s["folds"] for s in seconds.values()),  # every member it was fitted on
                           "seconds": sum(s["seconds"] for s in seconds.values())}
    unseen = sorted(set(table["grade"]) - set(train_meta["grade"].astype(str)), key=grade_order)
    y, prior = table["score"].to_numpy(float), float(train_meta["score"].mean())
    test_children = {name: per_child(y, p, table["speaker"].to_numpy(), prior, (table["change"] == "own").to_numpy())
                     for name, p in preds.items() if name != "prior (base rate)"}
    return {"oof_children": oof_children(data, assets, children), "test_children": test_children, "data": str(data), "children": held_out_check(data),
            "source_children": sorted(children) if children is not None else None, "n_train": len(train_meta), "n_test": len(table),
            "grades_unseen_in_training": unseen, "step_seconds": summary.get("seconds", {}),
            "changes_in_test": table["change"].value_counts().reindex(CHANGES, fill_value=0).to_dict(),
            "predictors": {name: predictor_report(table, p) for name, p in preds.items()},
            "fold_seconds": seconds, "oof_logloss": summary["oof_logloss"],
            "blend": config.get("blend"), "fold_by": config.get("fold_by"),
            "weights": {m["model"]: m["weight"] for m in config["members"]},
            "decomposition": summary.get("decomposition", {})}


def per_child(y: np.ndarray, p: np.ndarray, children: np.ndarray, prior: float, correct: np.ndarray) -> dict:
    """One predictor's figures by child: each child's log loss, the median and the worst child, how many
    children score worse than the training base rate on their own clips, and the log loss of the correct
    readings (the child's own sentence), overall and of the worst child."""
    from readaloud.metrics import log_loss
    rows = pd.DataFrame({"y": y, "p": p, "child": children, "correct": correct})
    losses, above = {}, []
    for child, part in rows.groupby("child", sort=True):
        losses[str(child)] = log_loss(part["y"].to_numpy(), part["p"].to_numpy())
        if losses[str(child)] > log_loss(part["y"].to_numpy(), np.full(len(part), prior)):
            above.append(str(child))
    worst = max(losses, key=losses.get)
    right = rows[rows["correct"]]
    return {"logloss": log_loss(y, p), "correct_logloss": log_loss(right["y"].to_numpy(), right["p"].to_numpy()),
            "median_child": float(np.median(list(losses.values()))), "worst_child": worst,
            "worst_child_logloss": losses[worst], "children_above_prior": above, "n_children": len(losses),
            "children": losses}


def source_children(source: Path) -> set[str]:
    """The speakers of the children's source folder (its utterances.csv): the training half may also hold
    other speakers (`--extra-train`), whose clips train every model but are not children to report on."""
    import csv
    with open(source / "utterances.csv", newline="") as fh:
        return {row["speaker"] for row in csv.DictReader(fh)}


def oof_table(data: Path, assets: Path) -> tuple[pd.DataFrame, list[str]]:
    """(every OOF clip that all members scored, with its members' logits and its speaker and change from
    speakers.csv; the member names)."""
    from readaloud.pipeline.ensemble import collect_oof, oof_matrix
    table, names = oof_matrix(collect_oof(assets))
    table = table.join(pd.read_csv(data / "speakers.csv", dtype=str).set_index("filename"), on="filename")
    if table["speaker"].isna().any():
        raise ValueError(f"{data / 'speakers.csv'} names no child for OOF clip "
                         f"{table.loc[table['speaker'].isna(), 'filename'].iloc[0]}")
    return table, names


def children_figures(table: pd.DataFrame, preds: dict[str, np.ndarray], children: set[str] | None) -> dict:
    """per_child of each predictor's probabilities over the rows of `table` by the given children (all
    rows when None): every row may have fitted a blend, but --extra-train speakers are not children to
    report on. The prior is those children's base rate."""
    keep = table["speaker"].isin(children).to_numpy() if children is not None else np.ones(len(table), bool)
    if not keep.any():
        raise ValueError("no OOF clip is by a child of the source folder")
    y = table["score"].to_numpy(float)[keep]
    prior = float(y.mean())
    correct = (table["change"] == "own").to_numpy()[keep]
    return {name: per_child(y, p[keep], table["speaker"].to_numpy()[keep], prior, correct)
            for name, p in preds.items()}


def oof_children(data: Path, assets: Path, children: set[str] | None = None) -> dict:
    """Per-child figures of the out-of-fold predictions on the training children (folds grouped by
    child: no child's clips were scored by a model that heard that child), for each member and for the
    ensemble (its blend of the members' OOF logits), and for the ensemble with its blend fitted without
    each fold in turn (the blend's weights are fitted on these same clips; cross-fitted, nothing of the
    ensemble saw the clip it scores)."""
    from readaloud.metrics import sigmoid
    from readaloud.pipeline.ensemble import cross_fitted_logits, read_config
    config = read_config(assets)
    table, names = oof_table(data, assets)
    weights = {m["model"]: m["weight"] for m in config["members"]}
    preds = {m: sigmoid(table[m].to_numpy(float)) for m in names}
    preds["ensemble"] = sigmoid(sum(w * table[m].to_numpy(float) for m, w in weights.items()) + config["bias"])
    if len(names) > 1:  # the blend's weights fitted without each fold in turn: nothing of it saw the clip
        preds["ensemble, blend cross-fitted"] = sigmoid(cross_fitted_logits(table, names, config.get("blend", "logit")))
    return children_figures(table, preds, children)


def child_lines(title: str, figures: dict) -> list[str]:
    """A table of per-child figures, one row per predictor."""
    lines = [f"{title}\n", "| | log loss | correct readings | median child | worst child | children above the prior |",
             "|---|---|---|---|---|---|"]
    for name, f in figures.items():
        above = f["children_above_prior"]
        lines.append(f"| {name} | {f['logloss']:.4f} | {f['correct_logloss']:.4f} | {f['median_child']:.4f} | "
                     f"{f['worst_child_logloss']:.4f} ({f['worst_child']}) | {len(above)} of {f['n_children']}"
                     + (f" ({', '.join(above[:6])}{' ...' if len(above) > 6 else ''})" if above else "") + " |")
    return lines


def grade_order(grade: str) -> tuple:
    """KG before 1, 2, 3 (then anything else by name)."""
    return (0, 0, "") if grade == "KG" else (1, int(grade), "") if grade.isdigit() else (2, 0, grade)


def _cell(value) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def report_lines(report: dict, options: list[str], wall: float) -> list[str]:
    """children.md: one row per predictor, columns overall, AUC, grades, change types, training time."""
    first = next(iter(report["predictors"].values()))
    grades = sorted(first["grade"], key=grade_order)
    unseen = set(report["grades_unseen_in_training"])
    changes = [c for c in CHANGES if c in first["change"]] + [c for c in first["change"] if c not in CHANGES]
    kids = report["children"]
    extra = sorted(set(kids["train"]) - set(report["source_children"])) if report.get("source_children") else []
    lines = ["# Children reading aloud: speaker-held-out test\n",
             f"{report['n_train']} training clips from {len(kids['train']) - len(extra)} children"
             + (f" and {len(extra)} other speakers (--extra-train; they train every model, the figures by child "
                f"leave them out)" if extra else "") + f", {report['n_test']} test "
             f"clips from {len(kids['test'])} other children (each clip once with its own sentence, once "
             f"changed); folds grouped by child ({report['fold_by']}); ensemble blend {report['blend']}, OOF log "
             f"loss {report['oof_logloss']:.4f} (all training clips); options `{' '.join(options) or '(defaults)'}`; "
             f"this run {wall:.0f} s wall on {os.cpu_count()} CPUs (load {os.getloadavg()[0]:.1f} at the end).\n",
             "Test log loss (AUC overall), per grade and per change type; fold seconds = training time "
             "summed over the member's folds (the ensemble's: over all members); test seconds = inference on "
             "the test clips:\n"]
    cols = ["log loss", "AUC", *(f"grade {g}" + ("*" if g in unseen else "") for g in grades), *changes,
            "fold seconds", "test seconds"]
    lines += ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in report["predictors"].items():
        secs = report["fold_seconds"].get(name, {}).get("seconds")
        cells = [r["logloss"], r["auc"], *(r["grade"][g]["logloss"] for g in grades),
                 *(r["change"][c]["logloss"] for c in changes)]
        test_secs = report["step_seconds"].get(f"inference {name}")
        lines.append(f"| {name} | " + " | ".join(map(_cell, cells))
                     + "".join(f" | {'-' if v is None else f'{v:.0f}'}" for v in (secs, test_secs)) + " |")
    counts = ", ".join(f"{c} {n}" for c, n in report["changes_in_test"].items())
    if unseen:
        lines += ["", f"\\* no training child of grade {', '.join(sorted(unseen, key=grade_order))}: "
                      f"those clips get the model's 'unknown' grade."]
    steps = ", ".join(f"{k} {v:.0f}" for k, v in report["step_seconds"].items())
    lines += ["", f"Wall seconds per step of this run (a rerun skips finished folds): {steps}."]
    lines += ["", f"Test clips per change type: {counts}. Ensemble weights: "
              + ", ".join(f"{m} {w:.3f}" for m, w in report["weights"].items()) + "."]
    lines += ["", *child_lines("Out of fold, on the training children (folds grouped by child; what every choice "
                               "is decided on):", report["oof_children"])]
    lines += ["", *child_lines("On the test children:", report["test_children"])]
    if report.get("decomposition"):
        lines += ["", *quality.decomposition_lines(report["decomposition"])]
    lines += ["", "![reliability](reliability.png)", "", "![changes](changes.png)"]
    return lines


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)  # "--tts" passes on
    p.add_argument("--out", required=True, help="folder for the set (DIR/data), the models and the report")
    p.add_argument("--source", default=None,
                   help=f"children's utterances.csv and audio (default: {shared_path('data/speechocean_kids')}; "
                        f"with --retrain, the source the run was built from)")
    p.add_argument("--builder", default=str(shared_path("bench/read_aloud_set.py")))
    p.add_argument("--test-speakers", type=int, default=8, help="children held out for the test")
    p.add_argument("--extra-train", nargs="*", default=[], metavar="SOURCE",
                   help="other speakers' folders for the training half only (e.g. ../shared/data/speechocean_adults)")
    p.add_argument("--seed", type=int, default=0, help="the builder's seed (which children, which changes)")
    p.add_argument("--train_seed", type=int, default=None,
                   help="train.py --seed: one seed for every variant (default: each variant's own); with a "
                        "single model's retraining, how far its seed alone moves the figures")
    p.add_argument("--models", default=None, help="comma-separated variants, or 'all' (default: the default ensemble)")
    p.add_argument("--n_folds", type=int, default=4)
    p.add_argument("--tts_dir", default=None, help="reference cache (default: DIR/tts, or RUN/tts with --retrain)")
    p.add_argument("--retrain", default=None, metavar="RUN",
                   help="a finished run of this benchmark (its --out): train the members named by --models again "
                        "with the options given, on RUN's data folder, keeping RUN's other members' folds")
    args, passthrough = p.parse_known_args(argv)
    from readaloud.plots import plot_grouped_losses
    t0 = time.time()
    out = Path(args.out).resolve()
    if out == ROOT or ROOT in out.parents:
        raise SystemExit(f"--out {out} is inside the repository: the set's recordings never go there")
    models, run = args.models, Path(args.retrain).resolve() if args.retrain else None
    if run is not None:
        if not args.models:
            raise SystemExit("--retrain needs --models: the members to train again")
        if run == out:
            raise SystemExit(f"--retrain {run}: --out must be another folder (the run's own folds stay as they are)")
        data = run / "data"
        if not (data / "speakers.csv").is_file():
            raise SystemExit(f"--retrain {run}: no data/speakers.csv there (not a run of this benchmark)")
        # the children to report on are those of the source the run's set was built from (its recipe)
        if not args.source and not (data / "bench_recipe.json").is_file():
            raise SystemExit(f"--retrain {run}: no data/bench_recipe.json to say which children's source it was "
                             f"built from: pass --source")
        source = Path(args.source or json.loads((data / "bench_recipe.json").read_text())["source"]).resolve()
        retrained = [m for m in args.models.split(",") if m]
        kept = keep_members(run / "assets", out / "assets", set(retrained))
        models = ",".join([*kept, *retrained])
        print(f"retraining {', '.join(retrained)} on {data}; kept from {run / 'assets'}: {', '.join(kept) or 'none'}",
              flush=True)
    else:
        source = Path(args.source or shared_path("data/speechocean_kids")).resolve()
        data = build_set(Path(args.builder).resolve(), source, out / "data", args.test_speakers,
                         args.seed, [Path(p).resolve() for p in args.extra_train])
    held_out_check(data)  # before any training
    options = [*(["--models", models] if models else []), "--n_folds", str(args.n_folds), *passthrough]
    options += ["--seed", str(args.train_seed)] if args.train_seed is not None else []
    options += ["--tts_dir", str(Path(args.tts_dir).resolve() if args.tts_dir else (run or out) / "tts")]
    summary = quality.main(["--data", str(data), "--out", str(out), "--assets", str(out / "assets"),
                            "--groups", str(data / "speakers.csv"), *options])
    report = children_report(data, summary, source_children(source))
    wall = time.time() - t0
    report |= {"options": options, "wall_seconds": wall, "load_average": os.getloadavg()[0],
               **({"retrained_from": str(run)} if run is not None else {})}
    change_losses = {name: {c: r["change"][c]["logloss"] for c in CHANGES if c in r["change"]}
                     for name, r in report["predictors"].items()}
    plot_grouped_losses(change_losses, out / "changes.png", title="Test log loss per change type")
    lines = report_lines(report, options, wall)
    (out / "children.md").write_text("\n".join(lines) + "\n")
    (out / "children.json").write_text(json.dumps(report, indent=1))
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
