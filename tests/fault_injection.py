"""Runs a fold script with a fault injected through the trainer's test hooks (trainer.HOOKS):

    python tests/fault_injection.py die_after_eval N train_model1mean.py ARGS...   # killed after evaluation N
    python tests/fault_injection.py nan_from_step N train_model1mean.py ARGS...    # every loss NaN from update N

The script then runs exactly as `python train_model1mean.py ARGS...` would.
"""
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from readaloud.pipeline import trainer  # noqa: E402 (after the path is set)


def main() -> None:
    kind, n, script, *args = sys.argv[1:]
    n = int(n)
    if kind == "die_after_eval":  # die like a killed process
        trainer.HOOKS.after_evaluation.append(lambda state: os._exit(137) if state["evals"] == n else None)
    elif kind == "nan_from_step":  # a diverged model
        trainer.HOOKS.loss.append(lambda loss, state: loss * float("nan") if state["step"] >= n else loss)
    else:
        raise SystemExit(f"unknown fault {kind!r}")
    sys.argv = [script, *args]
    runpy.run_path(str(ROOT / script), run_name="__main__")


if __name__ == "__main__":
    main()
