"""Log metrics straight to the loggers at the current step: the one path measurements and
interventions share (as ``LearningRateMonitor`` does; an epoch-level ``self.log`` would average
several measurements made in one task, and callbacks measure outside ``training_step``)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from lightning_plasticity.callbacks.wandb_task_axis import log_spectra

__all__ = ["log_now"]


def log_now(trainer: pl.Trainer, scalars: dict[str, float],
            spectra: dict[str, Tensor] | None = None) -> None:
    """Write ``scalars`` to every logger (and ``spectra`` to wandb) at this step.

    Spectra go to a :class:`~lightning.pytorch.loggers.WandbLogger` as histograms and, with a
    :class:`~lightning_plasticity.callbacks.WandbTaskAxis` callback, as per-task tables (see
    :func:`~lightning_plasticity.callbacks.wandb_task_axis.log_spectra`). Non-finite values are
    logged as such (``nan``/``inf`` in the CSV, gaps in a chart), so that a measurement that went
    wrong shows instead of vanishing.
    """
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    for logger in trainer.loggers:
        logger.log_metrics(dict(scalars), step=step)
        if spectra and isinstance(logger, WandbLogger) and trainer.is_global_zero:
            log_spectra(trainer, logger, spectra, step)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in scalars.items()})
