"""``GradientInterferenceCallback``: cosine similarity of per-example gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_plasticity.callbacks.measurement import MeasurementCallback, MeasurementSkipped
from lightning_plasticity.callbacks.probe import ModuleLossFn, module_loss
from lightning_plasticity.measures.gradient_interference import (
    GradientInterference,
    gradient_interference_from_gram,
    per_example_gradient_gram,
)
from lightning_plasticity.measures.parameter_selection import select_parameters


class GradientInterferenceCallback(MeasurementCallback):
    """Tracks gradient interference between examples (Lyle et al. 2023).

    ``C[i, j] = cos(g_i, g_j)`` for the per-example loss gradients ``g_i`` of the probe batch
    (:func:`lightning_plasticity.measures.gradient_interference.gradient_interference`). A high
    mean off-diagonal cosine means updates on one input move all others alike; a low rank of the
    gradient matrix means the network can only move in few directions.

    The per-example loss is the module's own loss (``loss_fn``, ``plasticity_loss`` or
    ``training_step``) on the probe batch sliced to that one example, so any batch structure and
    any loss (multi-label BCE, regression, a custom objective) is measured as trained; for a
    loss that averages over the batch this is exactly the example's loss. Or, with
    ``example_loss_fn(output, target)``, that function of the head output and the batch's
    second item. ``n`` backward passes; the ``n x P`` gradients are held at once. Under DDP
    every rank computes the matrix of the whole probe batch (no collective).

    Logged under ``grads/``: ``mean_cosine``, ``rank``, ``rank_fraction``, ``mean_grad_norm``.

    Args:
        example_loss_fn: optional loss of one example's head output and target.
        probe_size, loss_fn, on_task_start, on_task_end, every_n_train_steps, every_n_tasks: see
            :class:`MeasurementCallback`.

    Example::

        >>> import tempfile
        >>> from functools import partial
        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.callbacks import GradientInterferenceCallback
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import MLP, ContinualClassifier
        >>> _ = torch.manual_seed(0)
        >>> dm = ContinualDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=2,
        ...                          batch_size=16, val_size=32)
        >>> model = ContinualClassifier(network=partial(MLP, width=16))
        >>> cb = GradientInterferenceCallback(probe_size=16)
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp(),
        ...                   callbacks=[cb])
        >>> trainer.fit(model, datamodule=dm)
        >>> [(h["task"], h["event"]) for h in cb.history]  # at the start of every task
        [(0, 'task_start'), (1, 'task_start')]
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("grads/"))
        ... # doctest: +NORMALIZE_WHITESPACE
        ['grads/mean_cosine', 'grads/mean_grad_norm', 'grads/measure_seconds/gradient_interference',
         'grads/rank', 'grads/rank_fraction']
        >>> int(trainer.callback_metrics["grads/rank"])  # 16 linearly independent gradients
        16
    """

    prefix = "grads"
    shard_probe = False

    def __init__(
        self,
        example_loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        probe_size: int = 64,
        loss_fn: ModuleLossFn | None = None,
        on_task_start: bool = True,
        on_task_end: bool = False,
        every_n_train_steps: int | None = None,
        every_n_tasks: int = 1,
    ) -> None:
        super().__init__(probe_size=probe_size, loss_fn=loss_fn, on_task_start=on_task_start,
                         on_task_end=on_task_end, every_n_train_steps=every_n_train_steps,
                         every_n_tasks=every_n_tasks)
        if example_loss_fn is not None and not callable(example_loss_fn):
            raise ValueError("GradientInterferenceCallback: example_loss_fn must be "
                             "callable(output, target).")
        self.example_loss_fn = example_loss_fn

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        if self.example_loss_fn is not None and not (isinstance(batch, (tuple, list))
                                                     and len(batch) >= 2):
            raise MeasurementSkipped("example_loss_fn needs (inputs, targets, ...) batches; "
                                     "leave it unset to use the module's own loss")
        super().check(trainer, pl_module, batch)

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                reduce: Callable[[Tensor], Tensor] | None) -> GradientInterference:
        params = select_parameters(pl_module)
        if self.example_loss_fn is None:
            def loss_of(sub: Any) -> Tensor:
                return module_loss(pl_module, sub, self.loss_fn)
        else:
            head = self.head_output(pl_module, batch)

            def loss_of(sub: Any) -> Tensor:
                return self.example_loss_fn(head(sub), sub[1]).sum()
        gram, num_params, dtype = per_example_gradient_gram(loss_of, batch, params, pl_module)
        return gradient_interference_from_gram(gram, dtype=dtype, num_params=num_params)
