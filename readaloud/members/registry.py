"""The model families of the ensemble: config model.arch -> its Member class.

Adding a family: one folder in members/ with a module holding its Member subclass (see base.py; a
network is a NeuralMember naming its model class), its import and one entry in FAMILIES below,
and a variant in variants.py that sets `arch` to it.
"""
from __future__ import annotations

from ..config import ConfigError, ModelConfig, RunConfig
from .base import Member
from .decoder.decoder import WhisperDecoderMember
from .encdec.encdec import EncDecMember
from .gbm.gbm import GBMMember
from .pair.encoder import SpeechEncoderModel, build_network
from .pair.neural import NeuralMember
from .pair.pair import PairMember

FAMILIES: dict[str, type[Member]] = {m.family: m for m in (
    PairMember,
    EncDecMember,
    GBMMember,
    WhisperDecoderMember,
)}


def member_named(arch: str) -> Member:
    """The family called `arch` (config model.arch, a checkpoint's "arch")."""
    if arch not in FAMILIES:
        raise ConfigError(f"--model.arch: {arch!r} is not one of {tuple(FAMILIES)}")
    return FAMILIES[arch]()


def member_for(cfg: RunConfig | ModelConfig) -> Member:
    """The family that trains and loads models of this config."""
    return member_named(cfg.model.arch if isinstance(cfg, RunConfig) else cfg.arch)


def build_model(cfg: ModelConfig, n_tasks: int, n_grades: int, vocab_size: int,
                whisper_config: dict | None = None) -> SpeechEncoderModel:
    """The network of a neural family's config: fresh (from the backbone when cfg.backbone),
    or the skeleton a checkpoint's weights are loaded into (`whisper_config` from it)."""
    member = member_for(cfg)
    if not isinstance(member, NeuralMember):
        raise ConfigError(f"model.arch {cfg.arch!r} is not a network")
    return build_network(member.model_class, cfg, n_tasks, n_grades, vocab_size, whisper_config)
