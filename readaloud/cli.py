"""Command-line plumbing shared by the entry-point scripts (they stay a few lines each)."""
from __future__ import annotations

import argparse

from .config import ConfigError


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data", help="data folder in the competition layout (default: data)")
    p.add_argument("--assets", default="assets", help="folder of trained models and configs (default: assets)")
    p.add_argument("--tts_dir", default="tts_data", help="cache of synthesized references (default: tts_data)")


def add_ray_options(p: argparse.ArgumentParser, unit: str = "fold") -> None:
    """--ray [ADDRESS], --cpus_per_<unit>, --gpus_per_<unit>: run each <unit> as a Ray task (readaloud.ray_jobs)."""
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help=f"run each {unit} as a Ray task: without a value on a local cluster of this machine's cores, "
                        "'auto' joins the running cluster, or give its address (host:port)")
    p.add_argument(f"--cpus_per_{unit}", type=float, default=1.0,
                   help=f"with --ray: CPUs reserved per {unit} (default 1; also its torch threads, at least 1)")
    p.add_argument(f"--gpus_per_{unit}", type=float, default=0.0,
                   help=f"with --ray: GPUs per {unit}, fractions allowed: 0.5 puts two on one GPU (default 0)")


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
