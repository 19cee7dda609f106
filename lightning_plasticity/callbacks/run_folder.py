"""Where a callback writes a run's files: its own ``dirpath``, else the trainer's log folder."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

__all__ = ["run_folder"]


def run_folder(trainer: pl.Trainer, dirpath: Path | None = None) -> Path:
    """``dirpath``, else ``trainer.log_dir`` (else ``default_root_dir``).

    Call it on every rank: ``trainer.log_dir`` broadcasts under DDP, so reading it on rank 0
    alone would leave rank 0 waiting in a collective the other ranks never join.
    """
    return dirpath or Path(trainer.log_dir or trainer.default_root_dir)
