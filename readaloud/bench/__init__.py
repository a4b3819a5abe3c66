"""Benchmarks: each a `python -m readaloud.bench.<name>` command that measures and writes a report."""
from __future__ import annotations

import json
from pathlib import Path

from ..checkpoints import atomic_write


def write_report(out: str | Path, stem: str, report: dict, markdown: str) -> dict:
    """A benchmark's figures as <out>/<stem>.json and its table as <stem>.md (both atomic), printed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{stem}.json", json.dumps(report, indent=1))
    atomic_write(out / f"{stem}.md", markdown)
    print(markdown)
    return report
