"""Everything that turns a data folder into model inputs, shared by preprocess, train, infer.

Clip features live in `<data>/cache/clips_<featurekey>.*`, references in `tts_data/`, folds in
`<data>/cache/folds_<k>.csv`. Each step only does what is missing, so calling it again is
cheap, and a clip that cannot be decoded is listed (file and reason), never silently lost.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..checkpoints import atomic_csv
from ..data import load_split
from ..features import FeatureParams, FeatureStore, iter_clip_features
from ..layout import bad_clips_path, cache_dir, clip_store_name, writable_dir
from .clip_digests import sync_clip_caches
from .folds import load_or_create_folds
from .references import ReferenceBank

log = logging.getLogger(__name__)


def clip_store(data_dir: str | Path, params: FeatureParams = FeatureParams()) -> FeatureStore:
    return FeatureStore(cache_dir(data_dir), clip_store_name(params.key()), params)


def read_bad_clips(data_dir: str | Path) -> dict[str, str]:
    path = bad_clips_path(data_dir)
    if not path.exists():
        return {}
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return dict(zip(df["filename"], df["error"]))


def ensure_clip_features(data_dir: str | Path, filenames: list[str], params: FeatureParams = FeatureParams(),
                         workers: int = 1, progress: bool = True, retry_bad: bool = False) -> tuple[FeatureStore, dict[str, str]]:
    """Featurize every listed clip not cached yet. Returns the store and {filename: error}. First,
    every cache of the folder forgets the listed clips whose content changed (clip_digests)."""
    data_dir = Path(data_dir)
    sync_clip_caches(data_dir, filenames)
    store = clip_store(data_dir, params)
    bad = read_bad_clips(data_dir)
    todo = [f for f in dict.fromkeys(filenames) if f not in store and (retry_bad or f not in bad)]
    if todo:
        errors: dict[str, str] = {}

        def featurized():
            stream = iter_clip_features([data_dir / f for f in todo], params, workers)
            for path, frames, error in tqdm(stream, total=len(todo), desc="features", unit="clip",
                                            disable=not progress):
                if error is not None:
                    errors[path.name] = error
                else:
                    bad.pop(path.name, None)
                    yield path.name, frames

        store.add_many(featurized())
        bad.update(errors)
        for name, error in errors.items():
            log.warning("unusable clip skipped: %s", error)
        atomic_csv(pd.DataFrame(sorted(bad.items()), columns=["filename", "error"]), bad_clips_path(data_dir))
    listed = {f: bad[f] for f in filenames if f in bad}
    return store, listed


def ensure_references(tts_dir: str | Path, tts_spec: str, texts, params: FeatureParams = FeatureParams(),
                      progress: bool = True) -> ReferenceBank:
    bank = ReferenceBank(writable_dir(tts_dir, "tts"), tts_spec, params)
    made = bank.ensure(texts, progress=progress)
    if made:
        log.info("synthesized %d new reference texts into %s", made, bank.root)
    return bank


def prepare_training_data(data_dir: str | Path, tts_dir: str | Path, n_folds: int, tts_specs, n_mels_set,
                          workers: int = 2, progress: bool = True) -> TrainingInputs:
    """Everything trainers read, made once up front so parallel jobs only read caches: the
    references of every (TTS, n_mels), the clip features of every n_mels, the fold file."""
    meta = load_split(data_dir, "train").meta
    banks, stores = {}, {}
    for n_mels in sorted(set(n_mels_set)):
        params = FeatureParams(n_mels=n_mels)
        for spec in sorted(set(tts_specs)):
            banks[spec, n_mels] = ensure_references(tts_dir, spec, meta["expected_text"].unique(), params, progress)
        stores[n_mels], _ = ensure_clip_features(data_dir, meta["filename"].tolist(), params, workers, progress)
    load_or_create_folds(data_dir, meta, n_folds)
    return TrainingInputs(meta, banks, stores)


@dataclass
class TrainingInputs:
    """The training metadata with its reference banks {(tts spec, n_mels): bank} and clip
    feature stores {n_mels: store}, as prepare_training_data left them."""
    meta: pd.DataFrame
    banks: dict
    stores: dict
