"""Where a neural fold's training curves go besides metrics.csv: TensorBoard and Weights & Biases."""
from __future__ import annotations

import logging
import os

from ..config import RunConfig
from ..layout import FoldPaths

log = logging.getLogger("readaloud.train")


class Trackers:
    """TensorBoard (on by default) and Weights & Biases (--wandb; offline without an account)."""

    def __init__(self, cfg: RunConfig, paths: FoldPaths, resumed_step: int | None):
        self.tb = self.wandb = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(paths.run_dir / "tensorboard"), purge_step=resumed_step)
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("--wandb needs the wandb package: pip install wandb") from None
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb.init(project=cfg.wandb_project, name=paths.stem, id=paths.stem.replace("_", "-"),
                                    dir=str(paths.run_dir), config=cfg.to_dict(), mode=mode, resume="allow",
                                    reinit=True)

    def log(self, row: dict, step: int) -> None:
        scalars = {k: v for k, v in row.items() if k not in ("epoch", "step") and v == v}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k.replace("_", "/", 1), v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({**scalars, "epoch": row["epoch"]}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
