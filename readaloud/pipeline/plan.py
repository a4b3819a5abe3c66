"""The cost of a run before it starts: hours and disk of each stage, on this machine, for a data folder.

    python -m readaloud.pipeline.plan [--data data] [--models a,b] [--n_folds K] [--jobs N] [--sample 12]
                                      [--clips N [--test_clips M]] [--gpus G --gpu_speedup X]
                                      [--assets assets] [--json FILE] [any --key value]
    python train.py --plan [the same options]

Every rate is measured here, now, on a sample of the folder's own clips (spread over their
durations), copied into a temporary folder that is deleted afterwards: the data folder, its caches
and the assets are only read. Each stage is the pipeline's own code on the sample: TTS references,
clip features, each member's per-clip caches (model6asr's alignment features, its ASR evidence per
Whisper, its fold ears in their parts and its ear copies; model8decoder's frozen encoder), one fold of
each member (one epoch of a network) on a two-fold split of the sample, and inference on the sample's
test clips (once with no cache, once with them). A stage's time is a start-up (a model load) plus a
cost per clip, told apart by timing it on a few clips, then more, then more again; the cost per clip is scaled by the folder's
clip lengths (Whisper's padded window, or the clip's duration). Training is `--n_folds` folds, `--jobs` at a
time on cores/jobs threads each (assumed not to slow each other: a lower bound), of the variant's
epochs (early stopping may stop sooner). Disk is the bytes each stage's caches took per clip on the
sample. GPUs are on paper only: `--gpus G --gpu_speedup X` divides the Whisper and training stages
by X per GPU and G GPUs (an assumption the user states, printed as such; nothing here measured one).

With --clips N (training clips; --test_clips M, else the folder's test/train ratio) a second
table shows the same rates at that size, with the folder's mean clip length. It trains nothing
that is kept, and takes about a minute with the default sample.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..cli import add_common, parse_overrides
from ..config import ConfigError, RunConfig, apply_overrides
from ..data import DataError, load_split
from ..features import WHISPER_WINDOW_S, whisper_window_s
from ..layout import fold_files
from ..prep.folds import FoldFileError, data_set_n_folds, load_or_create_folds, mark_current
from ..variants import default_variants, resolve_models, variant_config

SR = 16000
WINDOW_S = 10.0  # the shortest window the Whisper members read a clip in (features.whisper_window_s)


class PlanError(RuntimeError):
    """A data folder the plan cannot read: what and where."""


@dataclass
class Stage:
    """One stage's measured cost: `fixed_s` once, plus `per_unit_s` per unit (a clip, a text, or a
    fold's clip x epoch), scaled by the clips' length (`scale`: window, duration or none);
    `bytes_per_unit` on disk (`fixed_bytes` once per fold for a fold's files, once per ear for an ear).
    Unit `ears` (model6asr's fold ears): `fixed_s` and `fixed_bytes` per ear (K + 1 of them, one more
    copy published in the assets), `per_unit_s` per clip-pass of fine-tuning (a clip scored 1 or one
    of its copies, one epoch), so K folds cost K x (clips scored 1) x (1 + copies) x epochs passes."""
    name: str
    unit: str            # train | test | clips | texts | fold_train | fold_test | ears
    per_unit_s: float
    fixed_s: float
    bytes_per_unit: float
    scale: str = "none"  # window | duration | none
    fixed_bytes: float = 0.0
    source: str = "measured on the sample"
    whisper: bool = True  # what a GPU would run (--gpu_speedup applies)
    epochs: int = 1       # a fold's passes over its clips (fold_train), an ear's over its clips (ears)
    copies: int = 0       # ears: the ear copies each clip scored 1 is trained beside (1 + copies clips a pass)


# ---- the folder ---------------------------------------------------------------------------------------

def clip_seconds(data: Path, names) -> np.ndarray:
    """Each clip's duration from its header (soundfile.info: no decoding); NaN where unreadable."""
    import soundfile as sf
    out = np.full(len(names), np.nan)
    for i, name in enumerate(tqdm(list(names), desc="clip headers", unit="clip", leave=False)):
        try:
            info = sf.info(str(data / name))
            out[i] = info.frames / info.samplerate
        except (RuntimeError, OSError, ValueError):  # soundfile's LibsndfileError is a RuntimeError
            pass
    return out


@dataclass
class Folder:
    data: Path
    train: pd.DataFrame     # with a `seconds` column
    test: pd.DataFrame

    @property
    def texts(self) -> int:
        return int(pd.concat([self.train["expected_text"], self.test["expected_text"]]).nunique())


def read_folder(data: str | Path) -> Folder:
    data = Path(data)
    if not data.is_dir():
        raise PlanError(f"no data folder {data} (--data: a folder in the competition layout, see README.md)")
    try:
        train = load_split(data, "train", check_audio=False).meta
        test = load_split(data, "test", check_audio=False).meta if (data / "test_metadata.csv").exists() \
            else train.iloc[:0]
    except (DataError, FileNotFoundError) as exc:
        raise PlanError(f"{data}: {exc}") from None
    train = train.assign(seconds=clip_seconds(data, train["filename"]))
    test = test.assign(seconds=clip_seconds(data, test["filename"]))
    if not np.isfinite(train["seconds"]).any():
        raise PlanError(f"{data}: none of the {len(train)} clips of train_metadata.csv can be read "
                        f"(first: {train['filename'].iloc[0] if len(train) else 'none listed'})")
    return Folder(data, train, test)


def existing_n_folds(data: str | Path) -> int | None:
    """The fold count of the folder's fold file, None without one (and no cache folder made to look)."""
    return data_set_n_folds(data) if fold_files(data) else None


def unit_length(seconds, scale: str) -> np.ndarray:
    """What a clip's cost grows with: the padded window Whisper reads it in, its duration, or nothing."""
    s = np.asarray(seconds, dtype=float)
    s = s[np.isfinite(s)]
    if scale == "window":
        return np.array([whisper_window_s(int(x * SR), WINDOW_S) for x in s]) if s.size else np.array([WINDOW_S])
    if scale == "duration":
        return np.minimum(s, WHISPER_WINDOW_S) if s.size else np.array([1.0])
    return np.ones(max(1, s.size))


def spread_sample(meta: pd.DataFrame, n: int) -> pd.DataFrame:
    """n readable rows spread evenly over the clips' durations (shortest to longest)."""
    ok = meta[np.isfinite(meta["seconds"])].sort_values("seconds", kind="stable").reset_index(drop=True)
    if len(ok) <= n:
        return ok
    return ok.iloc[np.unique(np.linspace(0, len(ok) - 1, n).round().astype(int))].reset_index(drop=True)


def sample_workspace(folder: Folder, n_train: int, n_test: int, root: Path) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """A data folder under `root` with copies of a spread sample of the folder's clips, two stratified folds."""
    data = root / "data"
    data.mkdir(parents=True)
    train, test = spread_sample(folder.train, n_train), spread_sample(folder.test, n_test)
    for name in pd.concat([train["filename"], test["filename"]]):
        shutil.copy2(folder.data / name, data / name)
    cols = ["filename", "task", "expected_text", "grade"]
    train[cols].to_csv(data / "train_metadata.csv", index=False)
    train[["filename", "score"]].to_csv(data / "train_labels.csv", index=False)
    if len(test):
        test[cols].to_csv(data / "test_metadata.csv", index=False)
        pd.DataFrame({"filename": test["filename"], "score": 0.5}).to_csv(data / "submission_format.csv", index=False)
    load_or_create_folds(data, train, 2)
    mark_current(data, 2)
    return data, train, test


# ---- timing -------------------------------------------------------------------------------------------

def folder_bytes(*paths: Path) -> int:
    return sum(f.stat().st_size for p in paths if p.exists() for f in p.rglob("*") if f.is_file())


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def fixed_and_per_item(fn, items: list, warm: int = 2) -> tuple[float, float]:
    """(start-up s, s per item) of `fn(items[:k])`, a call that does only what its cache lacks: timed on
    `warm` items (the start-up and those), then on a third of the rest, then on the rest. Two sizes of
    new work tell a start-up each call repeats (a model loaded per call) from the cost per item."""
    warm = min(warm, max(1, len(items) - 2))
    mid = warm + max(1, (len(items) - warm) // 3)
    t0 = timed(lambda: fn(items[:warm]))
    t1 = timed(lambda: fn(items[:mid]))
    t2 = timed(lambda: fn(items))
    n1, n2 = mid - warm, len(items) - mid
    per = t2 / max(1, n2)
    if n2 > n1:
        slope = (t2 - t1) / (n2 - n1)
        per = slope if 0 < slope <= per else per   # noise (a loaded machine) may invert the two: then the mean
    return max(0.0, t0 - per * warm), per


# ---- the stages -----------------------------------------------------------------------------------------

SAMPLE_FOLDS = 2   # the sample's folds, for the caches a member fills before its folds
FOLD_EARS_STAGE = "fold ears"   # measured in its parts: measure_fold_ears
EAR_COPIES_STAGE = "ear copies (perturbed clips, every Whisper)"


def cache_variants(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """The per-clip caches a member fills before its folds, as (stage, config filling that one only);
    model6asr's split into alignment, each Whisper's evidence and the ear copies."""
    mc = cfg.model
    if mc.arch == "whisperdec":
        return [(f"frozen encoder cache ({mc.backbone})", cfg)]
    if mc.arch == "pair" and mc.ear_evidence:   # the fold ears (model6asr's when both run: counted once), then the rest
        return [(FOLD_EARS_STAGE, cfg), ("shared caches", apply_overrides(cfg, {"ear_evidence": False}))]
    if mc.arch != "gbm":
        return [("shared caches", cfg)]
    backbones = [b.strip() for b in str(mc.asr_backbones).split(",") if b.strip()] \
        if "asr" in mc.gbm_features.split("+") else []
    out = []
    alone = {"gbm_ear_copies": 0, "asr_fold_ears": False, "asr_ear_agreement": False}   # that cache only
    if "alignment" in mc.gbm_features.split("+"):
        out.append(("alignment features (DTW)", apply_overrides(cfg, {**alone, "gbm_features": "alignment"})))
    for b in backbones:
        out.append((f"ASR evidence ({b})", apply_overrides(cfg, {**alone, "asr_backbones": b})))
    # after the backbones' stages (their evidence is cached by then); it fills the ear backbone's encoder cache,
    # which model8decoder's stage then finds filled (one cache, counted where it is filled first)
    if mc.asr_fold_ears and backbones:
        out.append((FOLD_EARS_STAGE, apply_overrides(cfg, {"asr_backbones": backbones[0], "gbm_ear_copies": 0})))
    if mc.gbm_ear_copies > 0:
        out.append((EAR_COPIES_STAGE, cfg))
    return out


def prepared_by(member, cfg: RunConfig, data: Path, meta: pd.DataFrame, inputs):
    """A fill of a cache stage: the member's prepare_shared on the named clips of the sample."""
    def fill(names):
        sub = type(inputs)(meta[meta["filename"].isin(set(names))], inputs.banks, inputs.stores)
        member.prepare_shared(sub, [cfg], data, progress=False)
    return fill


def copies_read_by(ears, cfg: RunConfig, data: Path, meta: pd.DataFrame, inputs):
    """A fill of the ear copies' stage (model6asr's ear_copy_table, as prepare_shared calls it) whose copies' ear
    block is read by `ears`, the fold ears of the whole sample."""
    from ..members.gbm.closed import task_words
    from ..members.gbm.gbm import FeatureLayout, asr_device, ear_copy_table
    layout = FeatureLayout.of(cfg.model)
    folded = meta.assign(fold=load_or_create_folds(data, meta, SAMPLE_FOLDS).to_numpy())
    refs = inputs.banks[cfg.tts, cfg.model.n_mels] if layout.alignment else None
    words = task_words(meta)

    def fill(names):
        ear_copy_table(layout, cfg.model, folded[folded["filename"].isin(set(names))], data, refs, [],
                       asr_device(cfg.device), 0, False, words, ears)
    return fill


def ear_order(meta: pd.DataFrame, folds: np.ndarray) -> list[str]:
    """The sample's clips in the order the fold ears' timing grows it: the clips scored 1 of each fold in
    turn first, so that every part timed (SAMPLE_FOLDS clips or more) gives each fold's ear a clip to
    adapt on (the other folds' clips scored 1), then the rest."""
    positives = meta.assign(fold=folds)[meta["score"].to_numpy() == 1]
    by_fold = [list(part["filename"]) for _, part in positives.groupby("fold", sort=True)]
    ordered = [name for turn in itertools.zip_longest(*by_fold) for name in turn if name is not None]
    first = set(ordered)
    return ordered + [n for n in meta["filename"] if n not in first]


def measure_caches(variant: str, cfg: RunConfig, data: Path, tts: Path, sample: pd.DataFrame) -> list[Stage]:
    """Each per-clip cache of the member on the sample's training clips (members' prepare_shared)."""
    from ..members.registry import member_for
    from ..prep.prepare import prepare_training_data
    inputs = prepare_training_data(data, tts, SAMPLE_FOLDS, {cfg.tts}, {cfg.model.n_mels}, workers=1, progress=False)
    meta = inputs.meta.set_index("filename").loc[sample["filename"]].reset_index()
    stages, ears = [], None
    for name, part in cache_variants(cfg):
        if name == FOLD_EARS_STAGE:
            ears_stages, ears = measure_fold_ears(variant, part, data, meta)
            stages += ears_stages
            continue
        before = folder_bytes(data / "cache")
        # the ear copies read by the sample's fold ears: prepare_shared on a part of the sample would train
        # that part's own ears (the ears' cost is measured above, once)
        fill = copies_read_by(ears, part, data, meta, inputs) if ears is not None and name == EAR_COPIES_STAGE \
            else prepared_by(member_for(part), part, data, meta, inputs)
        fixed, per = fixed_and_per_item(fill, list(meta["filename"]))
        grown = folder_bytes(data / "cache") - before
        stages.append(Stage(f"{variant}: {name}", "train", per, fixed, grown / len(meta),
                            "duration" if "alignment" in name else "window"))
    return stages


def measure_fold_ears(variant: str, cfg: RunConfig, data: Path, meta: pd.DataFrame) -> tuple[list[Stage], object]:
    """The fold ears (members/gbm/fold_ears.py: model6asr's, the pair's with ear_evidence), in the parts that grow
    differently: the frozen encoder's cache of every clip, the ear copies of the clips scored 1, the fine-tuning of K + 1 ears (a start-up and a
    folder per ear, a cost per clip-pass), and each clip decoded by its fold's ear (the sample's K + 1 ears,
    trained on clips ordered by ear_order: every fold's ear gets one). Returns the stages and those ears."""
    from ..members.gbm.ear_augment import ensure_copies
    from ..members.gbm.fold_ears import FoldEars, copy_settings, ears_root, ensure_ear, recipe_of, train_fold_ears
    recipe = recipe_of(cfg.model)
    folded = meta.assign(fold=load_or_create_folds(data, meta, SAMPLE_FOLDS).to_numpy())
    order = ear_order(folded, folded["fold"].to_numpy())
    indexed = folded.set_index("filename")

    def rows(names) -> pd.DataFrame:
        return indexed.loc[list(names)].reset_index()
    caches = FoldEars(recipe, {})   # one encoder cache per folder (the clips', the copies'), loaded once
    memory = caches.memory(data)
    stages = []

    def per_clip(name: str, fill, scale: str) -> None:
        before = folder_bytes(data)
        fixed, per = fixed_and_per_item(fill, order)
        stages.append(Stage(f"{variant}: fold ears: {name}", "train", per, fixed,
                            (folder_bytes(data) - before) / len(order), scale))

    per_clip(f"encoder cache ({recipe.backbone}, the clip + {recipe.margin_s:g} s)",
             lambda names: memory.ensure(list(names), False), "window")
    if recipe.copies:
        def copies(names):
            part = rows(names)
            folder, made = ensure_copies(data, part[part["score"].to_numpy() == 1], copy_settings(recipe), False)
            caches.memory(folder).ensure(made["filename"].tolist(), False)
        per_clip("ear copies of the clips scored 1 and their encoder cache", copies, "window")
    # One ear's fine-tuning, timed on one full batch a pass and on three: a handful of clips in part-filled
    # batches would tell nothing of the cost per clip. The sample's clips (any score: the cost is the text's and
    # the clip's, not the label's), shortest and longest in turn so that each part has the sample's lengths.
    by_length = list(folded["filename"])   # the sample's order: shortest to longest (spread_sample)
    spread = [by_length[i // 2] if i % 2 == 0 else by_length[-1 - i // 2] for i in range(len(by_length))]
    timings = []
    for n in (recipe.batch_size, 3 * recipe.batch_size):
        part = rows([spread[i % len(spread)] for i in range(n)])
        t = time.perf_counter()
        ear = ensure_ear(recipe, data, part, memory, ears_root(data) / "plan", progress=False)
        timings.append((time.perf_counter() - t, n * recipe.epochs, folder_bytes(ear)))
    (t_one, p_one, _), (t_three, p_three, ear_bytes) = timings
    per = t_three / p_three
    if 0 < (t_three - t_one) / (p_three - p_one) <= per:   # else noise: the mean
        per = (t_three - t_one) / (p_three - p_one)
    stages.append(Stage(f"{variant}: fold ears: fine-tuning K + 1 ears ({recipe.epochs} epochs)", "ears", per,
                        max(0.0, t_three - per * p_three), 0.0, "duration", fixed_bytes=ear_bytes,
                        epochs=recipe.epochs, copies=recipe.copies))
    ears = train_fold_ears(recipe, data, folded, progress=False)   # the sample's own, which the stages below read
    per_clip("each clip decoded by its fold's ear", lambda names: ears.table(rows(names), data, False), "duration")
    return stages, ears


def measure_preprocess(data: Path, tts: Path, train: pd.DataFrame, test: pd.DataFrame, cfgs: list[RunConfig]
                       ) -> list[Stage]:
    """TTS references (per text) and clip features (per clip), as preprocess.py makes them."""
    from ..features import FeatureParams
    from ..prep.prepare import ensure_clip_features, ensure_references
    stages = []
    for spec in sorted({c.tts for c in cfgs}):
        texts = list(dict.fromkeys(pd.concat([train["expected_text"], test["expected_text"]])))
        before = folder_bytes(tts)
        fixed, per = fixed_and_per_item(lambda t, spec=spec: ensure_references(tts, spec, t, progress=False), texts)
        stages.append(Stage(f"preprocess: TTS references ({spec})", "texts", per, fixed,
                            (folder_bytes(tts) - before) / max(1, len(texts)), whisper=False))
    names = list(pd.concat([train["filename"], test["filename"]]))
    for n_mels in sorted({c.model.n_mels for c in cfgs}):
        before = folder_bytes(data / "cache")
        fixed, per = fixed_and_per_item(
            lambda f, n_mels=n_mels: ensure_clip_features(data, f, FeatureParams(n_mels=n_mels), progress=False), names)
        stages.append(Stage(f"preprocess: clip features ({n_mels} mels)", "clips", per, fixed,
                            (folder_bytes(data / "cache") - before) / len(names), "duration", whisper=False))
    return stages


def recorded_fold(assets: Path, variant: str) -> dict | None:
    """Seconds per training clip (x epoch) of the variant's finished folds in `assets`, as they recorded them."""
    rows = []
    for summary in sorted(assets.glob(f"{variant}_*.json")) if assets.is_dir() else []:
        try:
            s = json.loads(summary.read_text())
            if s.get("variant") == variant and s.get("seconds") and s.get("n_valid"):
                rows.append(s["seconds"] / (s["n_valid"] * s["n_folds"] * max(1, s.get("epochs_run") or 1)))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return {"per_clip_epoch_s": float(np.median(rows)), "folds": len(rows)} if rows else None


def measure_fold(variant: str, cfg_overrides: dict, data: Path, tts: Path, assets: Path, threads: int,
                 n_clips: int, neural: bool) -> Stage:
    """One fold of the variant on the sample's two folds (one epoch of a network): the seconds of each epoch
    (metrics.csv) per clip, and the rest of the fold (building, writing) as its start-up."""
    from .fold_run import run_fold
    overrides = {**cfg_overrides, "threads": threads, "tensorboard": False} | ({"epochs": 1} if neural else {})
    summary = run_fold(variant, 0, data, assets, tts, overrides, n_folds=2, quiet=True, progress=False)
    # the published fold ear is the ears' stage's (counted once there, not once per fold)
    fold_bytes = folder_bytes(assets) - folder_bytes(assets / "backbones") - folder_bytes(assets / "ears")
    metrics = assets / "runs" / f"{variant}_0" / "metrics.csv"
    if not (neural and metrics.exists()):  # a fold on a dozen clips is all start-up: its growth is not measured
        return Stage(f"{variant}: training", "fold_train", 0.0, summary["seconds"], 0.0, fixed_bytes=fold_bytes,
                     source="sample fold: start-up only (finished folds in --assets give the rate per clip)")
    epoch_s = float(pd.read_csv(metrics)["seconds"].sum())
    return Stage(f"{variant}: training", "fold_train", epoch_s / n_clips, max(0.0, summary["seconds"] - epoch_s),
                 0.0, fixed_bytes=fold_bytes, epochs=variant_config(variant, cfg_overrides).epochs)


def measure_inference(variant: str, data: Path, tts: Path, assets: Path, test: pd.DataFrame,
                      caches: list[Stage]) -> list[Stage]:
    """infer.py on the sample's test clips with the variant's one fold, timed once its test caches are filled
    (the fold's predictions: a few rows, then all). The test clips' caches are the same per-clip work as the
    training clips' (`caches`, measured there; ear copies and the ears' fine-tuning are for training only), at
    the test clips' lengths."""
    from .inference import run_inference
    if not len(test):
        return []
    ck = sorted(p.name for p in assets.glob(f"{variant}_0.pth"))
    config = {"members": [{"model": variant, "weight": 1.0, "checkpoints": ck}], "bias": 0.0, "n_folds": 2}
    names = list(test["filename"])

    def infer(rows):
        run_inference(data, assets, tts, data.parent / "submission.csv", "cpu", progress=False, config=config,
                      rows=rows)
    infer(names)  # the test clips' caches
    fixed, per = fixed_and_per_item(infer, names)
    test_caches = [Stage(f"{variant}: inference, test clips' {c.name.split(': ', 1)[1]}", "test", c.per_unit_s,
                         c.fixed_s, c.bytes_per_unit, c.scale, source="the training clips' rate")
                   for c in caches if "ear copies" not in c.name and c.unit != "ears"]
    return test_caches + [Stage(f"{variant}: inference, each fold's predictions", "fold_test", per, fixed, 0.0)]


@dataclass
class Measured:
    """The stages' rates and the sample they were measured on (its clips' durations)."""
    stages: list[Stage]
    train_seconds: list[float]
    test_seconds: list[float]


def measure(folder: Folder, models: list[str], overrides: dict, jobs: int, n_sample: int, assets: Path) -> Measured:
    """Every stage of a run of `models` on `folder`, measured on a sample in a temporary folder."""
    cfgs = [variant_config(m, overrides) for m in models]
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    root = Path(tempfile.mkdtemp(prefix="readaloud-plan-"))
    try:
        data, train, test = sample_workspace(folder, n_sample, max(4, n_sample // 2), root)
        tts, fold_assets = root / "tts", root / "assets"
        steps = [("preprocess", None)] + [(m, c) for m, c in zip(models, cfgs)]
        stages: list[Stage] = []
        bar = tqdm(total=len(steps) * 3 - 2, desc="plan: measuring", unit="stage")
        try:
            stages += measure_preprocess(data, tts, train, test, cfgs)
            bar.update(1)
            for m, cfg in steps[1:]:
                caches = measure_caches(m, cfg, data, tts, train)
                stages += caches
                bar.update(1)
                from ..members.registry import member_for
                from ..members.pair.neural import NeuralMember
                neural = isinstance(member_for(cfg), NeuralMember)
                recorded = recorded_fold(assets, m)
                fold = measure_fold(m, overrides, data, tts, fold_assets, threads, len(train), neural)
                if recorded:
                    fold.per_unit_s, fold.fixed_s = recorded["per_clip_epoch_s"], 0.0
                    fold.source = f"recorded by {recorded['folds']} finished folds in {assets}"
                stages.append(fold)
                bar.update(1)
                stages += measure_inference(m, data, tts, fold_assets, test, caches)
                bar.update(1)
        finally:
            bar.close()
        return Measured(stages, train["seconds"].tolist(), test["seconds"].tolist())
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- the estimate -------------------------------------------------------------------------------------------

@dataclass
class Size:
    """What a run is sized by: clip counts, distinct texts, and the clips' durations (or their mean)."""
    train: int
    test: int
    texts: int
    train_seconds: list[float]
    test_seconds: list[float]
    label: str
    positive_rate: float     # the share of training clips scored 1 (what the fold ears train on)


def folder_size(folder: Folder) -> Size:
    return Size(len(folder.train), len(folder.test), folder.texts, folder.train["seconds"].tolist(),
                folder.test["seconds"].tolist(), f"{folder.data} as it is", positive_rate(folder))


def positive_rate(folder: Folder) -> float:
    return float((folder.train["score"].to_numpy() == 1).mean()) if len(folder.train) else 0.0


def scaled_size(folder: Folder, train: int, test: int | None) -> Size:
    """`train` (+ `test`) clips like the folder's: its mean clip length, its texts per clip, its test/train ratio."""
    if train < 1 or (test is not None and test < 0):
        raise PlanError(f"--clips must be at least 1 and --test_clips at least 0 (got {train}, {test})")
    test = round(train * len(folder.test) / max(1, len(folder.train))) if test is None else test
    n = len(folder.train) + len(folder.test)
    return Size(train, test, max(1, round(folder.texts * (train + test) / max(1, n))),
                folder.train["seconds"].tolist(), folder.test["seconds"].tolist(), f"{train:,} training + {test:,} test clips",
                positive_rate(folder))


def length_factor(target, sample, scale: str) -> float:
    """How much longer the target's clips take than the sample's, by what the stage grows with."""
    return float(unit_length(target, scale).mean() / unit_length(sample, scale).mean())


@dataclass
class Row:
    stage: str
    clips: int
    clips_per_s: float
    hours: float
    disk_gb: float
    gpu_hours: float | None
    source: str


def estimate(measured: Measured, size: Size, n_folds: int, jobs: int, gpus: int = 0, gpu_speedup: float = 0.0
             ) -> list[Row]:
    """Each stage's hours and disk at `size` from the measured rates. Folds run `jobs` at a time (on paper,
    `gpus` at a time, each `gpu_speedup` times this machine); per-clip Whisper work splits over the GPUs."""
    counts = {"train": size.train, "test": size.test, "clips": size.train + size.test, "texts": size.texts,
              "fold_train": size.train, "fold_test": size.test, "ears": size.train}
    target = {"train": size.train_seconds, "test": size.test_seconds, "clips": size.train_seconds + size.test_seconds,
              "ears": size.train_seconds}
    sample = {"train": measured.train_seconds, "test": measured.test_seconds,
              "clips": measured.train_seconds + measured.test_seconds, "ears": measured.train_seconds}
    rows = []
    for st in measured.stages:
        n = counts[st.unit]
        factor = length_factor(target.get(st.unit, [1.0]), sample.get(st.unit, [1.0]), st.scale)
        per = st.per_unit_s * factor * st.epochs
        if st.unit == "ears":   # K + 1 ears, one after another before the folds; one more copy in the assets
            passes = n_folds * n * size.positive_rate * (1 + st.copies)
            seconds, disk = (n_folds + 1) * st.fixed_s + per * passes, (n_folds + 2) * st.fixed_bytes
            parallel = min(gpus, n_folds + 1)
        elif st.unit.startswith("fold"):
            seconds = n_folds * (st.fixed_s + per * n) / min(max(1, jobs), n_folds)
            disk = n_folds * st.fixed_bytes
            parallel = min(gpus, n_folds)
        else:
            seconds, disk, parallel = st.fixed_s + per * n, st.bytes_per_unit * n * (factor if st.scale == "duration" else 1), gpus
        on_gpu = None
        if gpus and gpu_speedup:
            on_gpu = seconds * (min(max(1, jobs), n_folds) if st.unit.startswith("fold") else 1) / (
                gpu_speedup * parallel) / 3600 if st.whisper else seconds / 3600
        rows.append(Row(st.name, n, n / seconds if seconds > 0 else float("inf"), seconds / 3600, disk / 1e9, on_gpu,
                        st.source))
    return rows


def table(rows: list[Row], size: Size, n_folds: int, jobs: int, gpus: int, gpu_speedup: float) -> str:
    gpu = bool(gpus and gpu_speedup)
    head = f"| stage | clips | rate, clips/s | hours | disk, GB |{f' hours on {gpus} GPU(s), on paper |' if gpu else ''}"
    lines = [f"{size.label}: {size.train:,} training clips ({n_folds} folds, --jobs {jobs}), {size.test:,} test clips, "
             f"{size.texts:,} distinct texts\n", head, "|---|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
    for r in rows:
        lines.append(f"| {r.stage} | {r.clips:,} | {r.clips_per_s:.2f} | {r.hours:.3f} | {r.disk_gb:.3f} |"
                     + (f" {r.gpu_hours:.3f} |" if gpu else ""))
    total = sum(r.hours for r in rows)
    lines.append(f"| **total** | | | **{total:.2f}** | **{sum(r.disk_gb for r in rows):.2f}** |"
                 + (f" **{sum(r.gpu_hours for r in rows):.2f}** |" if gpu else ""))
    return "\n".join(lines)


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, load average {load} (1, 5, 15 min) when measured"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_common(p)
    add_plan_options(p)
    p.add_argument("--models", "--variants", dest="models", default=None,
                   help=f"comma-separated variants, or 'all' (default: {','.join(default_variants())})")
    p.add_argument("--n_folds", type=int, default=None, help="folds (default: the fold file's, else 6)")
    p.add_argument("--jobs", type=int, default=2, help="folds at a time, as train.py --jobs (default 2)")
    return p


def add_plan_options(p: argparse.ArgumentParser, gpus: bool = True) -> None:
    """The plan's own options (train.py --plan takes them too, with its own --gpus 0,1)."""
    p.add_argument("--sample", type=int, default=12, help="training clips the rates are measured on (default 12; "
                   "half as many test clips)")
    p.add_argument("--clips", type=int, default=None, help="also estimate for this many training clips")
    p.add_argument("--test_clips", type=int, default=None, help="... and this many test clips")
    if gpus:
        p.add_argument("--gpus", type=int, default=0, help="on paper: GPUs (with --gpu_speedup)")
    p.add_argument("--gpu_speedup", type=float, default=0.0,
                   help="on paper: how many times this machine's rate one GPU runs the Whisper and training stages "
                        "(your assumption or measurement; nothing here measures it)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rates and tables as JSON")


def plan(args, overrides: dict) -> dict:
    """Measure, estimate, print; returns what --json writes."""
    if args.sample < 3:
        raise PlanError(f"--sample must be at least 3 (got {args.sample})")
    if args.gpus and args.gpu_speedup <= 0:
        raise PlanError("--gpus needs --gpu_speedup X: how many times this machine's rate one GPU runs (an "
                        "assumption to state; nothing here can measure it)")
    models = resolve_models(args.models)
    folder = read_folder(args.data)
    n_folds = args.n_folds or existing_n_folds(args.data) or 6
    if n_folds < 2:
        raise PlanError(f"--n_folds must be at least 2 (got {n_folds})")
    t0 = time.time()
    measured = measure(folder, models, overrides, args.jobs, args.sample, Path(args.assets))
    took = time.time() - t0
    sizes = [folder_size(folder)] + ([scaled_size(folder, args.clips, args.test_clips)] if args.clips else [])
    out = {"machine": machine_line(), "models": models, "n_folds": n_folds, "jobs": args.jobs,
           "sample": {"train_seconds": measured.train_seconds, "test_seconds": measured.test_seconds},
           "measure_seconds": took, "stages": [asdict(s) for s in measured.stages], "tables": []}
    print(f"\nplan for {', '.join(models)} on {out['machine']}; rates measured in {took:.0f}s on "
          f"{len(measured.train_seconds)} training + {len(measured.test_seconds)} test clips of {args.data}")
    for size in sizes:
        rows = estimate(measured, size, n_folds, args.jobs, args.gpus, args.gpu_speedup)
        print("\n" + table(rows, size, n_folds, args.jobs, args.gpus, args.gpu_speedup))
        out["tables"].append({"size": asdict(size) | {"train_seconds": None, "test_seconds": None},
                              "rows": [asdict(r) for r in rows]})
    if args.gpus:
        print(f"\nGPU column: on paper, assuming one GPU runs the Whisper and training stages {args.gpu_speedup:g}x "
              f"as fast as this machine (your --gpu_speedup, not measured), {args.gpus} folds at a time and the "
              f"per-clip caches split over {args.gpus} GPUs (train.py fills them in one process today; "
              f"infer.py --ray shards inference)")
    print("\ntraining: the variant's epochs (early stopping may stop sooner); folds at a time on cores/jobs threads "
          "each, assumed not to slow each other")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def main(argv=None) -> dict:
    p = parser()
    args, rest = p.parse_known_args(argv)
    return run_plan(p, args, rest)


def run_plan(p: argparse.ArgumentParser, args, rest: list[str]) -> dict:
    """Parse the config overrides, run the plan, and turn its errors into the parser's (exit 2, one line)."""
    try:
        overrides = parse_overrides(rest)
        for m in resolve_models(args.models):
            variant_config(m, overrides)
    except (ConfigError, KeyError) as exc:
        p.error(exc.args[0] if exc.args else str(exc))
    try:
        return plan(args, overrides)
    except (ConfigError, PlanError, FoldFileError) as exc:
        p.error(exc.args[0] if exc.args else str(exc))


if __name__ == "__main__":
    main()
