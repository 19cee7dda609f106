"""``UnitActivityCallback``: dead, dormant, rarely active, linearized and saturated units."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_plasticity.callbacks.measurement import MeasurementCallback, MeasurementSkipped
from lightning_plasticity.callbacks.probe import ModuleLossFn, module_loss
from lightning_plasticity.core.reduction import reduce_stats
from lightning_plasticity.measures.unit_activity import (
    unit_activity_from_stats,
    unit_activity_stats_of_pass,
)


class UnitActivityCallback(MeasurementCallback):
    """Tracks unit-level mechanisms of plasticity loss on a probe batch.

    Definitions (see :func:`lightning_plasticity.measures.unit_activity.unit_activity`): dead
    units output zero on every probe input (Dohare et al. 2024); dormant units have ReDo score
    ``s_i = E|h_i| / mean_k E|h_k| <= tau`` (Sokar et al. 2023; ``tau=0`` counts units that are
    exactly silent, ``tau=0.025`` is Sokar et al.'s value); rarely active units are non-zero on
    fewer than ``rare_fraction`` of the inputs; linearized units have a positive pre-activation
    on every input (the ReLU acts as the identity); saturated units are tanh/sigmoid units
    beyond ``saturation_threshold`` on every input. Layers are found by hooking activation
    modules (ReLU, LeakyReLU, GELU, Tanh, Sigmoid, CReLU) and Linear/Conv outputs; conv channels
    are units. The inputs of ``Linear``/``Conv2d`` layers that no activation module produced are
    units too (``<layer>.input``), so ``F.relu`` and ``torch.relu`` in ``forward`` are seen. The
    pass is one run of the module's own loss on the probe batch (``loss_fn``,
    ``plasticity_loss`` or ``training_step``), so no ``forward`` is needed. Per layer, the
    pre-activation mean and standard deviation are logged with their
    drift since the task started and since the first measurement (Lyle et al. 2024's first
    mechanism).

    Under DDP the per-unit statistics are summed over ranks, so a unit is dead only if it is
    dead on every rank's shard, and the result equals one process on the whole probe batch.

    Logged under ``units/``: ``dead_fraction``, ``dormant_fraction``, ``rare_fraction``,
    ``linearized_fraction``, ``saturated_fraction``, the counts ``num_dead``, ``num_dormant``, ...
    and per layer ``<layer>/dead_fraction``, ``<layer>/dormant_fraction``, ... (the keys of
    :meth:`UnitActivity.scalars` with ``layer_first``), ``<layer>/preactivation_mean``,
    ``<layer>/preactivation_std`` and their ``_drift_task`` and ``_drift_init`` differences.

    Args:
        tau: ReDo dormancy threshold.
        rare_fraction: a unit active on fewer than this fraction of inputs is rarely active.
        saturation_threshold: tanh/sigmoid saturation level.
        layers: fnmatch filters of the layer names to measure (default: all found).
        probe_size, loss_fn, on_task_start, on_task_end, every_n_train_steps, every_n_tasks: see
            :class:`MeasurementCallback` (by default at task starts and ends, so the drift
            within a task is measured).

    Example::

        >>> import tempfile
        >>> from functools import partial
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.callbacks import UnitActivityCallback
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import MLP, ContinualClassifier
        >>> dm = ContinualDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=2,
        ...                          batch_size=16, val_size=32)
        >>> model = ContinualClassifier(network=partial(MLP, width=16))
        >>> cb = UnitActivityCallback(tau=0.0, probe_size=64)
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp(),
        ...                   callbacks=[cb])
        >>> trainer.fit(model, datamodule=dm)
        >>> [(h["task"], h["event"]) for h in cb.history]  # at task starts and ends
        [(0, 'task_start'), (0, 'task_end'), (1, 'task_start'), (1, 'task_end')]
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("units/"))[:3]
        ['units/dead_fraction', 'units/dormant_fraction', 'units/linearized_fraction']
    """

    prefix = "units"

    def __init__(
        self,
        tau: float = 0.025,
        rare_fraction: float = 0.01,
        saturation_threshold: float = 0.99,
        layers: Sequence[str] | None = None,
        probe_size: int = 512,
        loss_fn: ModuleLossFn | None = None,
        on_task_start: bool = True,
        on_task_end: bool = True,
        every_n_train_steps: int | None = None,
        every_n_tasks: int = 1,
    ) -> None:
        super().__init__(probe_size=probe_size, loss_fn=loss_fn, on_task_start=on_task_start,
                         on_task_end=on_task_end, every_n_train_steps=every_n_train_steps,
                         every_n_tasks=every_n_tasks)
        if tau < 0 or not 0 < rare_fraction < 1 or not 0 < saturation_threshold < 1:
            raise ValueError(
                "UnitActivityCallback: need tau >= 0, 0 < rare_fraction < 1 and "
                f"0 < saturation_threshold < 1; got {tau}, {rare_fraction}, "
                f"{saturation_threshold}.")
        self.tau, self.rare_fraction = tau, rare_fraction
        self.saturation_threshold = saturation_threshold
        self.layers = list(layers) if layers is not None else None
        self._reference_init: dict[str, tuple[float, float]] = {}
        self._reference_task: dict[str, tuple[float, float]] = {}

    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "tau": self.tau, "layers": self.layers}

    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                      task_id: int) -> None:
        self._reference_task = {}  # the next measurement becomes this task's reference
        super().on_task_start(trainer, pl_module, task_id)

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                reduce: Callable[[Tensor], Tensor] | None) -> list[dict[str, float]]:
        with torch.no_grad():
            stats = unit_activity_stats_of_pass(
                pl_module, lambda: module_loss(pl_module, batch, self.loss_fn), batch,
                self.layers, saturation_threshold=self.saturation_threshold)
        if not stats:
            raise MeasurementSkipped("no layer of units was found in the loss pass; pass layers=")
        result = unit_activity_from_stats(reduce_stats(stats, self.reducer(trainer)),
                                          tau=self.tau, rare_fraction=self.rare_fraction)
        drift: dict[str, float] = {}
        for layer, act in result.layers.items():
            stats_now = (act.preactivation_mean, act.preactivation_std)
            self._reference_init.setdefault(layer, stats_now)
            self._reference_task.setdefault(layer, stats_now)
            for i, name in enumerate(("preactivation_mean", "preactivation_std")):
                drift[f"{layer}/{name}_drift_task"] = stats_now[i] - self._reference_task[layer][i]
                drift[f"{layer}/{name}_drift_init"] = stats_now[i] - self._reference_init[layer][i]
        # The result's own keys (NaN fields that do not apply to a layer left out) and the drift
        # this callback tracks across measurements.
        return [result.scalars(layer_first=True), drift]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "reference_init": dict(self._reference_init),
                "reference_task": dict(self._reference_task)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._reference_init = {k: tuple(v) for k, v in state_dict.get("reference_init",
                                                                       {}).items()}
        self._reference_task = {k: tuple(v) for k, v in state_dict.get("reference_task",
                                                                       {}).items()}
