"""Command-line plumbing shared by the entry-point scripts (they stay a few lines each)."""
from __future__ import annotations

import argparse

from .config import ConfigError


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data", help="data folder in the competition layout (default: data)")
    p.add_argument("--assets", default="assets", help="folder of trained models and configs (default: assets)")
    p.add_argument("--tts_dir", default="tts_data", help="cache of synthesized references (default: tts_data)")


def parse_overrides(rest: list[str]) -> dict[str, str]:
    """['--lr', '2e-5', '--optim.weight_decay=0.1'] -> {'lr': '2e-5', 'optim.weight_decay': '0.1'}."""
    out, i = {}, 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}: options look like --key value")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            value, i = rest[i + 1], i + 2
        else:
            value, i = "true", i + 1  # a bare flag switches a boolean on
        out[key] = value
    return out
