"""Where every artifact lives: the bottom floor, imported by every step, importing nothing of the package.

A fold's files are named by its variant and fold here and nowhere else; a step that finds a
file learns what it is from the fold's saved summary (`<variant>_<fold>.json`), never by
taking its name apart.

    <assets>/<variant>_<fold>.pth        best weights + everything inference needs (written last)
    <assets>/<variant>_<fold>_oof.csv    out-of-fold predictions on the held-out fold
    <assets>/<variant>_<fold>.json       the fold's summary: variant, fold, n_folds, config, scores
    <assets>/runs/<variant>_<fold>/      metrics.csv, train.log, plots; while the fold trains also
                                         last.pth (resume state) and best.pth (removed once it is finished)
    <assets>/model_configs.json (+ .pkl) the ensemble
    <data>/cache/                        clip features, bad_clips.csv, folds_<k>.csv (+ .json), alignment tables
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("readaloud")

ENSEMBLE_JSON = "model_configs.json"   # the source of truth
ENSEMBLE_PKL = "model_configs.pkl"     # its plain-data twin
BACKBONE_HEADS = "ctc_head.safetensors"  # a pretrained backbone's phoneme heads ...
BACKBONE_VOCAB = "ctc_vocab.json"        # ... and their vocabulary


@dataclass(frozen=True)
class FoldPaths:
    """The files of one (variant, fold) in an assets folder."""
    assets: Path
    variant: str
    fold: int

    def __post_init__(self):
        object.__setattr__(self, "assets", Path(self.assets))

    @property
    def stem(self) -> str:
        return f"{self.variant}_{self.fold}"

    @property
    def checkpoint(self) -> Path:
        return self.assets / checkpoint_name(self.variant, self.fold)

    @property
    def oof(self) -> Path:
        return self.assets / f"{self.stem}_oof.csv"

    @property
    def summary(self) -> Path:
        return self.assets / f"{self.stem}.json"

    @property
    def run_dir(self) -> Path:
        return self.assets / "runs" / self.stem

    @property
    def config(self) -> Path:
        """The resolved config the fold trains with, written at its start."""
        return self.run_dir / "config.json"

    @property
    def last(self) -> Path:
        return self.run_dir / "last.pth"

    @property
    def best(self) -> Path:
        return self.run_dir / "best.pth"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.csv"

    @property
    def progress(self) -> Path:
        return self.run_dir / "progress.json"

    @property
    def aborted(self) -> Path:
        return self.run_dir / "aborted.json"

    @property
    def log(self) -> Path:
        return self.run_dir / "train.log"

    # written for the fold by others (the runner's log of its process, check_models' retrain
    # config): --force and --restart keep them when they clear the run folder
    @property
    def stdout_log(self) -> Path:
        return self.run_dir / "stdout.log"

    @property
    def requested_config(self) -> Path:
        return self.run_dir / "requested_config.json"

    def finished(self) -> bool:
        return self.checkpoint.exists() and self.oof.exists()

    @property
    def resume_state(self) -> tuple[Path, Path]:
        """What only an unfinished fold needs: the state it resumes from and its best weights so far
        (a finished fold's checkpoint holds those weights; a finished fold is skipped, --force and
        --restart clear the run folder)."""
        return self.last, self.best

    def read_summary(self) -> dict | None:
        """The fold's summary, or None when it is missing or unreadable."""
        try:
            return json.loads(self.summary.read_text())
        except (OSError, ValueError):
            return None


def checkpoint_name(variant: str, fold: int) -> str:
    return f"{variant}_{fold}.pth"


def summary_beside(checkpoint: str | Path) -> Path:
    """The summary of the fold whose checkpoint this is (it says what the fold is)."""
    return Path(checkpoint).with_suffix(".json")


def unfinished_folds(variants: list[str], folds: list[int], assets: str | Path, force: bool = False
                     ) -> list[tuple[str, int]]:
    """The (variant, fold) pairs a training run would train: all with `force`, else those not finished."""
    return [(v, f) for v in variants for f in folds if force or not FoldPaths(Path(assets), v, f).finished()]


def saved_folds(assets: str | Path) -> list[FoldPaths]:
    """Every fold with a readable summary in `assets`, identified by what the summary says."""
    found = []
    for path in sorted(Path(assets).glob("*.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and isinstance(info.get("variant"), str) and isinstance(info.get("fold"), int):
            paths = FoldPaths(Path(assets), info["variant"], info["fold"])
            if paths.summary == path:
                found.append(paths)
    return found


def fold_script(variant: str) -> str:
    """The entry script that trains one fold of `variant`."""
    return f"train_model{variant.removeprefix('model')}.py"


def retrain_command(variant: str, fold: int, n_folds: int, data: str | Path, assets: str | Path,
                    extra: str = "") -> str:
    cmd = f"python {fold_script(variant)} --fold {fold} --n_folds {n_folds}"
    if str(data) != "data":
        cmd += f" --data {data}"
    if str(assets) != "assets":
        cmd += f" --assets {assets}"
    return cmd + (f" {extra}" if extra else "")


# ---- a data folder's caches ---------------------------------------------------------------------

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
        fallback = fallback_dir(preferred, tag)
        fallback.mkdir(parents=True, exist_ok=True)
        log.warning("%s is not writable: caching in %s", preferred, fallback)
        return fallback


def fallback_dir(preferred: str | Path, tag: str) -> Path:
    """Where writable_dir puts what `preferred` cannot hold (not created here)."""
    key = hashlib.sha1(str(Path(preferred).resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"readaloud-{tag}-{key}"


def cache_dir(data_dir: str | Path) -> Path:
    return writable_dir(Path(data_dir) / "cache", "cache")


def existing_cache_dirs(data_dir: str | Path) -> list[Path]:
    """The data set's cache folders that exist (its temp fallback, then <data>/cache), for lookups
    that must not create one."""
    preferred = Path(data_dir) / "cache"
    return [d for d in (fallback_dir(preferred, "cache"), preferred) if d.is_dir()]


def clip_store_name(feature_key: str) -> str:
    return f"clips_{feature_key}"


def bad_clips_path(data_dir: str | Path) -> Path:
    return cache_dir(data_dir) / "bad_clips.csv"


def fold_path(data_dir: str | Path, n_folds: int) -> Path:
    return cache_dir(data_dir) / f"folds_{n_folds}.csv"


def fold_scheme_path(data_dir: str | Path, n_folds: int) -> Path:
    return fold_path(data_dir, n_folds).with_suffix(".json")


def current_folds_path(data_dir: str | Path) -> Path:
    """Which fold file is the data set's (the one preprocess.py made or confirmed last)."""
    return cache_dir(data_dir) / "folds.json"


def fold_files(data_dir: str | Path) -> dict[int, Path]:
    """{k: folds_<k>.csv} of every fold file in the data set's cache (a lookup: creates no folder;
    a file in <data>/cache wins over one in its temp fallback)."""
    found = {}
    for folder in existing_cache_dirs(data_dir):
        for path in folder.glob("folds_*.csv"):
            k = path.stem.removeprefix("folds_")
            if k.isdigit():
                found[int(k)] = path
    return dict(sorted(found.items()))


def alignment_cache_path(data_dir: str | Path, version: int, tts_folder: str, feature_key: str) -> Path:
    """One alignment-feature table per data folder, TTS voice, feature parameters and version."""
    return cache_dir(data_dir) / f"alignment_v{version}_{tts_folder}_{feature_key}.npz"
