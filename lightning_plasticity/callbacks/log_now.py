"""Log metrics straight to the loggers at the current step: the one path measurements and
interventions share (as ``LearningRateMonitor`` does; an epoch-level ``self.log`` would average
several measurements made in one task, and callbacks measure outside ``training_step``)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

__all__ = ["log_now"]


def log_now(trainer: pl.Trainer, scalars: dict[str, float],
            spectra: dict[str, Tensor] | None = None) -> None:
    """Write ``scalars`` to every logger (and ``spectra`` as wandb histograms) at this step.

    Non-finite values are logged as such (``nan``/``inf`` in the CSV, gaps in a chart), so that a
    measurement that went wrong shows instead of vanishing.
    """
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    for logger in trainer.loggers:
        logger.log_metrics(dict(scalars), step=step)
        if spectra and isinstance(logger, WandbLogger) and trainer.is_global_zero:
            import wandb

            logger.experiment.log({**{k: wandb.Histogram(v.numpy()) for k, v in
                                      spectra.items()}, "trainer/global_step": step})
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in scalars.items()})
