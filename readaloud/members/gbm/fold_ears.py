"""Fold ears: model6asr's trees also read what a Whisper adapted to the training voices hears.

The frozen Whispers mishear young readers: their correct readings come back as other words, and the
trees take that for a wrong answer. An ear fine-tuned on the training clips (whisper/adapt.py) hears
them better, but an ear that heard a clip must never score it. So, with K folds:

- ear k is fine-tuned on the clips scored 1 of every fold but k, and decodes fold k's clips (and the
  ear copies of fold k's clips): every training row's ear features come from an ear that never heard
  it, the held-out fold's included;
- fold k's trees train on the other folds' rows, each read by its own fold's ear, and score fold k's
  rows read by ear k: both sides come from ears in the same position (heard the other folds only);
- a test row is read by the ear of every training fold (`ALL`), copied into the assets folder beside
  the checkpoints (<assets>/ears/<key>), where inference and make_submission.py find it.

Each ear reads the frozen encoder's output cached once per clip (the clip + 1 s; the same cache as
model8decoder's when both run on tiny.en) and writes its transcript, whose teacher-forced evidence
(members/gbm/evidence.py, the open block: exact match, edits, log p of the expected text ...) is a
block of its own (`asr_ear_*`). An ear is named by its recipe and the content of the clips, texts and
labels it trained on: a rerun reuses a finished ear, any change trains a new one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from ...checkpoints import CHECKPOINT_FOLDER, CheckpointError
from ...config import ModelConfig
from ...features import file_lock
from ...layout import cache_dir
from ...prep.clip_digests import clip_digest, known_digests
from ...prep.folds import FoldFileError, data_set_n_folds, load_or_create_folds
from ...whisper.adapt import EAR_RECORD, AdaptedMemory, EarRecipe, fine_tune_decoder, is_ear, load_top, save_ct2
from ...whisper.backbones import ct2_folder
from . import evidence as asr
from .ear_augment import EarAugment, ensure_copies

log = logging.getLogger(__name__)
ALL = -1   # the ear of every training fold: what reads the test rows


def with_folds(meta: pd.DataFrame, data_dir: Path) -> pd.DataFrame | None:
    """`meta` with the data folder's fold of each row, or None when there is no fold file yet (the ears are then
    left to the folds, which know theirs)."""
    try:
        folds = load_or_create_folds(data_dir, meta, data_set_n_folds(data_dir)).to_numpy()
    except (FoldFileError, ValueError) as exc:
        log.info("fold ears left to the folds: %s", exc)
        return None
    return meta.assign(fold=folds)


def recipe_of(mc: ModelConfig) -> EarRecipe:
    return EarRecipe(backbone=mc.asr_ear_backbone, epochs=mc.asr_ear_epochs, lr=mc.asr_ear_lr, copies=mc.asr_ear_copies,
                     encoder_layers=mc.asr_ear_encoder_layers, seed=mc.asr_ear_seed)


def memory_cache(recipe: EarRecipe, data_dir: str | Path, device: str = "cpu", threads: int = 0):
    """The frozen encoder's cached output of a data folder's clips (the clip + recipe.margin_s), as
    model8decoder caches it: CTranslate2 float32 on the backbone's CTranslate2 folder; for an ear whose top
    encoder layers adapt (recipe.encoder_layers), the torch encoder's layers below them (model8decoder's
    cache with --decoder_ear_layers)."""
    from transformers import WhisperConfig
    from ...whisper.backbones import transformers_dir
    from ...whisper.encoding import Ct2WindowEncoder, lower_layers_encoder
    from ...whisper.encoder_cache import EncoderCache
    folder = ct2_folder(recipe.backbone)
    if folder is None:
        raise ValueError(f"fold ears need a named Whisper backbone or a CTranslate2 folder, not {recipe.backbone!r}")
    config = WhisperConfig.from_pretrained(transformers_dir(recipe.backbone))
    if recipe.encoder_layers:
        import torch
        from transformers import WhisperModel
        whisper = WhisperModel.from_pretrained(transformers_dir(recipe.backbone)).eval()
        encoder = lower_layers_encoder(whisper.encoder, recipe.encoder_layers,
                                       torch.device("cuda" if device == "cuda" else "cpu"))
    else:
        encoder = Ct2WindowEncoder(folder, "cuda" if device == "cuda" else "cpu", "float32", threads)
    return EncoderCache(encoder, config, data_dir, recipe.margin_s, recipe.window_s)


def ear_key(recipe: EarRecipe, data_dir: str | Path, rows: pd.DataFrame, known: dict[str, str] | None = None) -> str:
    """The recipe and what the ear trains on: each clip's content, expected text (and label, always
    1), in a fixed order. The content is the digest the pipeline step recorded for the clip
    (clip_digests.sync_clip_caches), else the file's own; an ear copy's follows from its source's and
    the copies' settings (in the recipe's key through EarAugment's). `known`: the folder's
    known_digests, read once by a caller that keys several ears."""
    known = known_digests(data_dir) if known is None else known
    h = hashlib.sha1(f"{recipe.key()}_{copy_settings(recipe).key() if recipe.copies else ''}".encode())
    for name, text in sorted(zip(rows["filename"].astype(str), rows["expected_text"].astype(str))):
        digest = known.get(name) or clip_digest(Path(data_dir) / name)
        h.update(f"{name}\t{digest}\t{' '.join(text.split())}\n".encode())
    return h.hexdigest()[:16]


def ears_root(data_dir: str | Path) -> Path:
    """Where a data folder's ears are trained (its cache)."""
    return cache_dir(data_dir) / "fold_ears"


def published_dir(assets: str | Path, key: str) -> Path:
    """Where the ear of every fold is kept for inference: the assets folder, beside the checkpoints."""
    return Path(assets) / "ears" / key


def publish(ear: Path, assets: str | Path) -> Path:
    """Copy a trained ear into the assets folder (once; copied beside and renamed into place)."""
    target = published_dir(assets, Path(ear).name)
    if is_ear(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(ear, work)
    try:
        work.replace(target)
    except OSError:   # another fold published it first
        shutil.rmtree(work, ignore_errors=True)
    return target


def ensure_ear(recipe: EarRecipe, data_dir: Path, rows: pd.DataFrame, memory, root: Path,
               progress: bool = True, known: dict[str, str] | None = None) -> Path:
    """The ear fine-tuned on `rows` (clips scored 1), trained now unless a finished one exists."""
    key = ear_key(recipe, data_dir, rows, known)
    target = root / key
    if is_ear(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{key}.lock"):   # parallel folds ask for the same ears: one trains, the rest wait
        if is_ear(target):
            return target
        memory.ensure(rows["filename"].tolist(), progress)
        usable = rows[np.array([n in memory for n in rows["filename"]], bool)]
        if usable.empty:   # a handful of clips (a plan's sample, a tiny fold): the ear is the backbone unadapted
            log.warning("no clip scored 1 to adapt the ear %s on in %s (%d rows scored 1, none readable): it is %s "
                        "as it is", key, data_dir, len(rows), recipe.backbone)
        log.info("fine-tuning an ear (%s) on %d clips scored 1 -> %s", recipe.backbone, len(usable), target)
        model = fine_tune_decoder(recipe, memory, usable, progress)
        return save_ct2(model, recipe, target, {"clips": len(usable)})


def copy_settings(recipe: EarRecipe) -> EarAugment:
    """The ear copies an ear trains on: model6asr's own (the same folder, made once)."""
    return EarAugment(copies=recipe.copies)


@dataclass
class PairedMemory:
    """The cached encoder output of a data folder's clips and of their ear copies (a folder of their
    own), each asked for by file name."""
    clips: object
    copies: object
    copy_names: set

    def _of(self, name: str):
        return self.copies if name in self.copy_names else self.clips

    def __contains__(self, name: str) -> bool:
        return name in self._of(name)

    def ensure(self, names, progress: bool = True) -> int:
        names = list(names)
        return self.clips.ensure([n for n in names if n not in self.copy_names], progress) + \
            self.copies.ensure([n for n in names if n in self.copy_names], progress)

    def get(self, name: str) -> np.ndarray:
        return self._of(name).get(name)

    def length(self, name: str) -> int:
        return self._of(name).length(name)


@dataclass
class FoldEars:
    """Which ear reads which rows: `dirs[k]` reads the rows of fold k, `dirs[ALL]` every row without
    a fold (test rows)."""
    recipe: EarRecipe
    dirs: dict[int, Path]
    device: str = "cpu"
    threads: int = 0
    _memories: dict = field(default_factory=dict)

    def memory(self, data_dir: Path):
        key = str(Path(data_dir).resolve())
        if key not in self._memories:
            self._memories[key] = memory_cache(self.recipe, data_dir, self.device, self.threads)
        return self._memories[key]

    def table(self, meta: pd.DataFrame, data_dir: Path, progress: bool = True) -> asr.AsrTable:
        """The ear block's evidence of every row of `meta` (its `fold` column picks the ear; rows
        without one are read by the ear of every fold), in `meta`'s order."""
        folds = meta["fold"].to_numpy(int) if "fold" in meta.columns else np.full(len(meta), ALL)
        X = np.full((len(meta), len(asr.FEATURE_NAMES)), np.nan, np.float32)
        ok = np.zeros(len(meta), bool)
        transcripts, words = [""] * len(meta), [[] for _ in range(len(meta))]
        memory = self.memory(data_dir)
        memory.ensure(meta["filename"].tolist(), progress)
        for fold in sorted(set(folds.tolist())):
            if fold not in self.dirs:
                raise ValueError(f"no ear for fold {fold} (ears for {sorted(self.dirs)})")
            rows = np.flatnonzero(folds == fold)
            model = ear_model(self.dirs[fold], self.device, self.threads)
            # an ear whose top encoder layers adapted reads the layers below through them
            top = ear_top(self.dirs[fold]) if self.recipe.encoder_layers else None
            heard = AdaptedMemory(memory, top) if top is not None else memory
            part = asr.asr_table(meta.iloc[rows], data_dir, model, ear_cache_path(data_dir, model, heard),
                                 progress=progress, memory=heard)
            X[rows], ok[rows] = part.X, part.ok
            for i, r in enumerate(rows):
                transcripts[r], words[r] = part.transcripts[i], part.words[i]
        return asr.AsrTable(X, ok, transcripts, words)


def published_ear_table(recipe: EarRecipe, folder: Path, meta: pd.DataFrame, data_dir: Path, device: str = "cpu",
                        progress: bool = True) -> asr.AsrTable:
    """The ear of every training fold (a published ear, `folder`) reading every row of `meta`, whatever
    fold column the rows carry: how a test row is read (GBMPredictor, infer.py --explain)."""
    return FoldEars(recipe, {ALL: Path(folder)}, device).table(meta.drop(columns=["fold"], errors="ignore"),
                                                              data_dir, progress)


def shared_ear_table(recipe: EarRecipe, folder: Path, inputs) -> asr.AsrTable:
    """The test rows of `inputs` (members.base.TestInputs) read by a published ear, computed once in an inference
    run and shared by every fold and member that reads that ear (inputs.shared)."""
    key = ("fold ear", str(folder))
    if key not in inputs.shared:
        inputs.shared[key] = published_ear_table(recipe, folder, inputs.rows, inputs.data_dir,
                                                 asr.asr_device(inputs.device), inputs.progress)
    return inputs.shared[key]


@lru_cache(maxsize=8)
def ear_model(folder: Path, device: str = "cpu", threads: int = 0) -> asr.WhisperEvidence:
    """One loaded ear per folder in a process (a run's K + 1 ears, beside gbm.evidence_model's backbones)."""
    return asr.WhisperEvidence(folder, device=device, threads=threads)


@lru_cache(maxsize=8)
def ear_top(folder: Path):
    """An ear's adapted top encoder layers, loaded once per folder in a process (None: a decoder-only ear)."""
    return load_top(folder)


def ear_cache_path(data_dir: Path, model: asr.WhisperEvidence, memory) -> Path:
    """The evidence of one ear on one data folder, decoded from that memory (not from the audio)."""
    return cache_dir(data_dir) / f"asr_v{asr.ASR_VERSION}_{model.identity}_mem{memory.store.name.split('_')[-1]}.npz"


def train_fold_ears(recipe: EarRecipe, data_dir: Path, meta: pd.DataFrame, device: str = "cpu",
                    threads: int = 0, progress: bool = True) -> FoldEars:
    """One ear per fold of `meta` (its `fold` and `score` columns), trained on the other folds' clips
    scored 1 (and their ear copies, recipe.copies), and the ear of every fold (ALL)."""
    ears = FoldEars(recipe, {}, device, threads)
    memory = ears.memory(data_dir)
    positives = meta[meta["score"].to_numpy() == 1]
    if recipe.copies > 0:   # the copies keep their source's fold: ear k never hears a copy of fold k's clips
        folder, copies = ensure_copies(data_dir, positives, copy_settings(recipe), progress)
        memory = PairedMemory(memory, ears.memory(folder), set(copies["filename"]))
        positives = pd.concat([positives, copies[positives.columns]], ignore_index=True)
    folds = sorted(set(meta["fold"].astype(int)))
    known = known_digests(data_dir)   # one read of the folder's digests for the K + 1 keys
    for k in folds:
        ears.dirs[k] = ensure_ear(recipe, data_dir, positives[positives["fold"] != k], memory, ears_root(data_dir),
                                  progress, known)
    ears.dirs[ALL] = ensure_ear(recipe, data_dir, positives, memory, ears_root(data_dir), progress, known)
    return ears


def ear_payload(ears: FoldEars, assets: str | Path) -> dict:
    """The ear of every fold published beside the checkpoints (`assets`), and its part of a fold's checkpoint:
    what checkpoint_ear reads back."""
    publish(ears.dirs[ALL], assets)
    return {"fold_ear": ears.dirs[ALL].name, "fold_ear_recipe": ears.recipe.key()}


def checkpoint_ear(ck: dict) -> Path:
    """The published ear a loaded checkpoint (one ear_payload wrote) reads test rows with: beside it
    (pipeline/inference.py load_fold_model says where it was read), and made by its recipe."""
    if "fold_ear" not in ck:
        raise CheckpointError("its config asks for a fold ear but it names none: retrain the fold")
    return published_ear(ck.get(CHECKPOINT_FOLDER, "."), str(ck["fold_ear"]), str(ck["fold_ear_recipe"]))


def published_ear(assets: str | Path, key: str, recipe_key: str) -> Path:
    """The ear a checkpoint reads test rows with (`key`: its folder under <assets>/ears), checked when
    the checkpoint loads: there, and made by the recipe the checkpoint was trained with."""
    folder = published_dir(assets, key)
    if not is_ear(folder):
        raise CheckpointError(f"the fold ear it reads test rows with, {folder}, is missing (train.py keeps it in "
                              f"the assets folder, make_submission.py ships it): retrain the folds or copy it there")
    made_by = json.loads((folder / EAR_RECORD).read_text()).get("key")
    if made_by != recipe_key:
        raise CheckpointError(f"{folder} was made by another recipe ({made_by}) than its trees read ({recipe_key}): "
                              f"retrain the folds")
    return folder
