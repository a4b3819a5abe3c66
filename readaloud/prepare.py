"""Everything that turns a data folder into model inputs, shared by preprocess, train, infer.

Clip features live in `<data>/cache/clips_<featurekey>.*`, references in `tts_data/`, folds in
`<data>/cache/folds_<k>.csv`. Each step only does what is missing, so calling it again is
cheap, and a clip that cannot be decoded is listed (file and reason), never silently lost.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from .checkpoints import atomic_csv
from .features import FeatureParams, FeatureStore, iter_clip_features
from .references import ReferenceBank

log = logging.getLogger(__name__)


def writable_dir(preferred: str | Path, tag: str) -> Path:
    """`preferred` if it can be written, else a stable folder under the system temp dir.

    A competition runtime mounts data/ read-only; caches then go to /tmp instead of failing.
    """
    preferred = Path(preferred)
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        probe = preferred / f".write_probe{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        return preferred
    except OSError:
        import hashlib
        import tempfile
        key = hashlib.sha1(str(preferred.resolve()).encode()).hexdigest()[:10]
        fallback = Path(tempfile.gettempdir()) / f"readaloud-{tag}-{key}"
        fallback.mkdir(parents=True, exist_ok=True)
        log.warning("%s is not writable: caching in %s", preferred, fallback)
        return fallback


def cache_dir(data_dir: str | Path) -> Path:
    return writable_dir(Path(data_dir) / "cache", "cache")


def clip_store(data_dir: str | Path, params: FeatureParams = FeatureParams()) -> FeatureStore:
    return FeatureStore(cache_dir(data_dir), f"clips_{params.key()}", params)


def bad_clips_path(data_dir: str | Path) -> Path:
    return cache_dir(data_dir) / "bad_clips.csv"


def read_bad_clips(data_dir: str | Path) -> dict[str, str]:
    path = bad_clips_path(data_dir)
    if not path.exists():
        return {}
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return dict(zip(df["filename"], df["error"]))


def ensure_clip_features(data_dir: str | Path, filenames: list[str], params: FeatureParams = FeatureParams(),
                         workers: int = 1, progress: bool = True, retry_bad: bool = False) -> tuple[FeatureStore, dict[str, str]]:
    """Featurize every listed clip not cached yet. Returns the store and {filename: error}."""
    data_dir = Path(data_dir)
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
                          workers: int = 2, progress: bool = True, alignment: set | None = None) -> None:
    """Everything trainers read, made once up front so parallel jobs only read caches;
    `alignment`: the (tts spec, n_mels) pairs whose alignment features gbm folds will read."""
    from .alignment import acoustic_table, alignment_cache_path
    from .data import load_split
    from .folds import load_or_create_folds
    meta = load_split(data_dir, "train").meta
    banks, stores = {}, {}
    for n_mels in sorted(set(n_mels_set) | {n for _, n in alignment or ()}):
        params = FeatureParams(n_mels=n_mels)
        for spec in sorted(set(tts_specs) | {t for t, _ in alignment or ()}):
            banks[spec, n_mels] = ensure_references(tts_dir, spec, meta["expected_text"].unique(), params, progress)
        stores[n_mels], _ = ensure_clip_features(data_dir, meta["filename"].tolist(), params, workers, progress)
    load_or_create_folds(data_dir, meta, n_folds)
    for spec, n_mels in sorted(alignment or ()):
        refs = banks[spec, n_mels]
        acoustic_table(meta, stores[n_mels], refs, alignment_cache_path(data_dir, refs), progress)
