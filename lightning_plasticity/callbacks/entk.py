"""``ENTKCallback``: rank, conditioning and interference of the empirical NTK."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
from torch import Tensor

from lightning_plasticity.callbacks.measurement import MeasurementCallback
from lightning_plasticity.callbacks.probe import ModuleLossFn
from lightning_plasticity.measures.entk import EmpiricalNTK, entk


class ENTKCallback(MeasurementCallback):
    """Tracks the empirical neural tangent kernel of the module on a probe batch.

    ``K[i, j] = sum_c J_c(x_i) . J_c(x_j)`` (the output-summed eNTK; see
    :func:`lightning_plasticity.measures.entk.entk`). A collapsing rank or exploding condition
    number means gradient steps on some inputs can no longer move the outputs independently;
    ``interference`` (mean off-diagonal over mean diagonal) is how much an update on one input
    moves the others (Lyle et al. 2023; Lewandowski et al. 2024).

    Logged under ``curvature/``: ``entk_rank``, ``entk_condition_number``, ``entk_interference``,
    ``entk_top_eigenvalue``, ``entk_trace``.

    The outputs are the head's (the last trainable layer the module's own loss calls), recorded
    while that loss runs on the probe batch, so no ``forward`` is needed.

    Under DDP every rank computes the kernel of the whole probe batch (it is small, and the
    n x n kernel cannot be split into per-rank sums), so all ranks agree without a collective.

    Args:
        method: ``"auto"``, ``"per_layer"`` (fast formula for Linear/Conv2d models) or
            ``"jacobian"`` (torch.func, any module).
        probe_size: examples in the probe batch (the kernel is ``probe_size`` squared).
        loss_fn, on_task_start, on_task_end, every_n_train_steps, every_n_tasks: see
            :class:`MeasurementCallback`.

    Example::

        >>> import tempfile
        >>> from functools import partial
        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.callbacks import ENTKCallback
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import MLP, ContinualClassifier
        >>> _ = torch.manual_seed(0)
        >>> dm = ContinualDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=2,
        ...                          batch_size=16, val_size=32)
        >>> model = ContinualClassifier(network=partial(MLP, width=16))
        >>> cb = ENTKCallback(probe_size=16)
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp(),
        ...                   callbacks=[cb])
        >>> trainer.fit(model, datamodule=dm)
        >>> [(h["task"], h["event"]) for h in cb.history]  # at the start of every task
        [(0, 'task_start'), (1, 'task_start')]
        >>> int(trainer.callback_metrics["curvature/entk_rank"])  # of the 16 x 16 summed kernel
        16
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("curvature/"))[:3]
        ['curvature/entk_condition_number', 'curvature/entk_interference', 'curvature/entk_rank']
    """

    shard_probe = False

    def __init__(
        self,
        method: Literal["auto", "per_layer", "jacobian"] = "auto",
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
        if method not in ("auto", "per_layer", "jacobian"):
            raise ValueError(
                f"ENTKCallback: method must be auto, per_layer or jacobian, got {method!r}.")
        self.method = method

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                reduce: Callable[[Tensor], Tensor] | None) -> EmpiricalNTK:
        model = self.head_output(pl_module, batch)
        return entk(model, batch, method=self.method)
