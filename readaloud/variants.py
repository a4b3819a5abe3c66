"""The registry of model variants: each is the default RunConfig with a few fields changed.

One small config per variant; `train_model<name>.py` only names its variant. Tests loop
over every registered variant.
"""
from __future__ import annotations

from .config import RunConfig, apply_overrides

VARIANTS: dict[str, dict] = {}


def register(name: str, description: str, **overrides) -> None:
    if name in VARIANTS:
        raise ValueError(f"variant {name!r} registered twice")
    VARIANTS[name] = {"description": description, "overrides": overrides}


def variant_config(name: str, overrides: dict | None = None) -> RunConfig:
    if name not in VARIANTS:
        raise KeyError(f"unknown model variant {name!r}; registered: {', '.join(sorted(VARIANTS))}")
    cfg = apply_overrides(RunConfig(), VARIANTS[name]["overrides"])
    return apply_overrides(cfg, overrides or {})


register("model1mean", "mean pooling over the pair, linear head",
         pooling="mean", head_layers=1)
register("model2attn", "attention pooling, linear head, another seed",
         pooling="attention", head_layers=1, seed=1)
register("model3mapd", "attention + mean pooling, 2-layer head with dropout",
         pooling="attention_mean", head_layers=2, head_dropout=0.2, seed=2)
