"""``GradientInterferenceCallback``: cosine similarity of per-example gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch.nn.functional as F
from torch import Tensor

from lightning_plasticity.callbacks.measurement import MeasurementCallback, MeasurementSkipped
from lightning_plasticity.measures.gradient_interference import gradient_interference


def _default_example_loss(output: Tensor, target: Tensor) -> Tensor:
    if target.is_floating_point():
        return F.mse_loss(output, target.reshape(output.shape).to(output.dtype))
    return F.cross_entropy(output, target)


class GradientInterferenceCallback(MeasurementCallback):
    """Tracks gradient interference between examples (Lyle et al. 2023).

    ``C[i, j] = cos(g_i, g_j)`` for the per-example loss gradients ``g_i`` of the probe batch
    (:func:`lightning_plasticity.measures.gradient_interference.gradient_interference`). A high
    mean off-diagonal cosine means updates on one input move all others alike; a low rank of the
    gradient matrix means the network can only move in few directions.

    The per-example loss is cross-entropy for integer targets and mean squared error otherwise,
    or ``example_loss_fn(output, target)``. Under DDP every rank computes the matrix of the
    whole probe batch (no collective).

    Logged under ``grads/``: ``mean_cosine``, ``rank``, ``rank_fraction``.

    Args:
        example_loss_fn: loss of one example's output and target.
        probe_size, on_task_start, on_task_end, every_n_train_steps, every_n_tasks: see
            :class:`MeasurementCallback`.

    Example::

        Trainer(callbacks=[GradientInterferenceCallback(probe_size=64)]).fit(model, dm)
    """

    prefix = "grads"
    shard_probe = False

    def __init__(
        self,
        example_loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        probe_size: int = 64,
        on_task_start: bool = True,
        on_task_end: bool = False,
        every_n_train_steps: int | None = None,
        every_n_tasks: int = 1,
    ) -> None:
        super().__init__(probe_size=probe_size, on_task_start=on_task_start,
                         on_task_end=on_task_end, every_n_train_steps=every_n_train_steps,
                         every_n_tasks=every_n_tasks)
        self.example_loss_fn = example_loss_fn or _default_example_loss

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise MeasurementSkipped("gradient interference needs (inputs, targets) batches")

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                reduce: Callable[[Tensor], Tensor] | None) -> dict[str, Any]:
        result = gradient_interference(pl_module, self.example_loss_fn, batch[0], batch[1])
        return {"mean_cosine": result.mean_cosine, "rank": result.rank,
                "rank_fraction": result.rank_fraction}
