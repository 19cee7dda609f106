"""``ParameterStatsCallback``: norms, distance and Wasserstein distance from init, stable rank."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from lightning_plasticity.callbacks.measurement import MeasurementCallback
from lightning_plasticity.measures.parameter_stats import parameter_stats, snapshot_parameters


class ParameterStatsCallback(MeasurementCallback):
    """Tracks parameter-level mechanisms: growing norms and drift from initialisation.

    Per layer and in total (:func:`lightning_plasticity.measures.parameter_stats.parameter_stats`):
    weight norm, mean ``|w|``, distance from initialisation ``||theta - theta_0||``, the
    per-tensor 1-D Wasserstein distance between the current and initial weight distributions
    (``wasserstein_p`` 1 or 2), the stable rank ``||W||_F^2 / ||W||_2^2`` of weight matrices, the
    update size ``||theta - theta_start||`` since the last task start, and the gradient norm
    (of the ``.grad`` left by the last step). ``theta_0`` is captured when training starts and
    kept in the checkpoint, so a resumed run keeps measuring against the true initialisation.

    Parameters are identical on every rank, so nothing is reduced under DDP.

    Logged under ``params/``: ``total/<stat>`` and ``<layer>/<stat>``.

    Args:
        wasserstein_p: 1 (mean ``|sort(theta) - sort(theta_0)|``) or 2 (its root mean square).
        stable_rank: also compute the stable rank (one small SVD per weight matrix).
        on_task_start, on_task_end, every_n_train_steps, every_n_tasks: see
            :class:`MeasurementCallback` (by default at task ends, so the update size covers
            the whole task).

    Example::

        >>> import tempfile
        >>> from functools import partial
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.callbacks import ParameterStatsCallback
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import MLP, ContinualClassifier
        >>> dm = ContinualDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=2,
        ...                          batch_size=16, val_size=32)
        >>> model = ContinualClassifier(network=partial(MLP, width=16))
        >>> cb = ParameterStatsCallback()
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp(),
        ...                   callbacks=[cb])
        >>> trainer.fit(model, datamodule=dm)
        >>> [(h["task"], h["event"]) for h in cb.history]  # at the end of every task
        [(0, 'task_end'), (1, 'task_end')]
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("params/total/"))[:3]
        ['params/total/distance_from_init', 'params/total/grad_norm', 'params/total/mean_abs']
        >>> bool(cb.history[-1]["params/total/grad_norm"] > 0)  # the task's last step's gradient
        True
        >>> bool(trainer.callback_metrics["params/total/distance_from_init"] > 0)
        True
    """

    prefix = "params"
    needs_probe = False

    def __init__(
        self,
        wasserstein_p: Literal[1, 2] = 1,
        stable_rank: bool = True,
        on_task_start: bool = False,
        on_task_end: bool = True,
        every_n_train_steps: int | None = None,
        every_n_tasks: int = 1,
    ) -> None:
        super().__init__(probe_size=1, on_task_start=on_task_start, on_task_end=on_task_end,
                         every_n_train_steps=every_n_train_steps, every_n_tasks=every_n_tasks)
        if wasserstein_p not in (1, 2):
            raise ValueError(f"ParameterStatsCallback: wasserstein_p must be 1 or 2, got "
                             f"{wasserstein_p}.")
        self.wasserstein_p, self.stable_rank = wasserstein_p, stable_rank
        self.init: dict[str, Tensor] | None = None
        self.task_start: dict[str, Tensor] | None = None
        self._last_grads: dict[str, Tensor] = {}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.init is None:  # not when resuming: the checkpoint holds the true theta_0
            self.init = snapshot_parameters(pl_module, device="cpu")

    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                      task_id: int) -> None:
        super().on_task_start(trainer, pl_module, task_id)
        self.task_start = snapshot_parameters(pl_module, device="cpu")

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._has_task_events(trainer):  # without tasks, an epoch is the unit of update
            self.task_start = snapshot_parameters(pl_module, device="cpu")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Lightning zeroes the gradients before validation, which runs before the task-end
        # measurement: keep the last step's gradients of an epoch for it.
        self._last_grads = {}
        if batch_idx + 1 >= trainer.num_training_batches:
            self._last_grads = {n: p.grad.detach().clone()
                                for n, p in pl_module.named_parameters() if p.grad is not None}

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        pass  # no loss involved

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                reduce: Callable[[Tensor], Tensor] | None) -> dict[str, float]:
        if self._last_grads and all(p.grad is None for p in pl_module.parameters()):
            # Restored by the measurement context afterwards.
            for name, p in pl_module.named_parameters():
                grad = self._last_grads.get(name)
                p.grad = None if grad is None else grad.to(p.device)
        stats = parameter_stats(pl_module, self.init, self.task_start,
                                wasserstein_p=self.wasserstein_p, stable_rank=self.stable_rank)
        return stats.scalars(layer_first=True)

    def state_dict(self) -> dict[str, Any]:
        # The last step's gradients are kept only at an epoch's end (for the task-end
        # measurement a checkpoint at a task boundary resumes into).
        return {**super().state_dict(), "init": self.init, "task_start": self.task_start,
                "last_grads": {k: v.cpu() for k, v in self._last_grads.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.init, self.task_start = state_dict.get("init"), state_dict.get("task_start")
        self._last_grads = dict(state_dict.get("last_grads", {}))

