"""``ReDo``: recycle dormant units (Sokar et al., 2023) every N steps and/or at task starts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_plasticity.callbacks.optimizer_state import reset_state_entries
from lightning_plasticity.callbacks.probe import (
    ModuleLossFn,
    first_examples,
    measurement_context,
    module_loss,
    select_probe_batch,
)
from lightning_plasticity.callbacks.shrink_and_perturb import ScheduledIntervention
from lightning_plasticity.measures.unit_utility import (
    ParamEntries,
    UnitLayer,
    dormant_units,
    find_unit_layers,
    reinitialize_units,
    unit_activity,
)


def reset_optimizer_entries(trainer: pl.Trainer, touched: Sequence[ParamEntries]) -> None:
    """Zero ``trainer.optimizers[0]``'s state of exactly the entries an intervention wrote."""
    if not trainer.optimizers:
        return
    optimizer = trainer.optimizers[0]
    for entries in touched:
        reset_state_entries(optimizer, entries.param, entries.index, entries.dim)


class ReDo(ScheduledIntervention):
    """Recycle dormant units: reinitialise their incoming weights, zero their outgoing weights.

    Sokar, Agarwal, Castro and Evci (ICML 2023, "The dormant neuron phenomenon in deep
    reinforcement learning") call unit ``i`` of a layer with ``K`` units tau-dormant when

        ``s_i = E|h_i| / ((1/K) sum_k E|h_k|) <= tau``

    with the expectation over a batch of inputs (and over the positions of a conv feature map).
    Every ``every_n_train_steps`` steps and/or at task starts this callback computes ``s`` on a
    probe batch (``trainer.datamodule.probe_batch(probe_size)`` with a ContinualDataModule, else
    the current training batch), in eval mode and without side effects, and for every dormant
    unit of every hidden layer

    * redraws its incoming weights (the unit's row of the preceding ``Linear``/``Conv`` and its
      bias entry, and its entries of a per-unit norm in between) from the layer's own
      initialisation, with a seed from :meth:`seed_for` (the global RNG streams are untouched);
    * sets its outgoing weights (its columns of the next ``Linear``/``Conv``) to zero, so the
      network's function does not change;
    * zeroes the optimizer state (Adam's ``exp_avg`` and ``exp_avg_sq``, momentum buffers) of
      exactly those rows and columns in ``trainer.optimizers[0]``. Without this the stale
      moments push recycled units straight back to dormancy, as users of implementations without
      it reported. (PyTorch's Adam keeps one ``step`` per tensor, see
      :func:`~lightning_plasticity.callbacks.optimizer_state.reset_state_entries`.)

    Every other weight and state entry stays bit-identical. ``tau = 0`` recycles only units that
    are exactly zero on every probe input (dead ReLUs); Sokar et al. use ``tau = 0.025`` for most
    of their experiments (and ``0.1`` in some), the default here.

    Layers: found by :func:`~lightning_plasticity.measures.unit_utility.find_unit_layers` in the
    package's ``MLP``, ``CNN``, ``ResNet18`` (inside residual blocks) and in ``Linear``/``Conv``
    -> activation -> ``Linear``/``Conv`` chains of any ``nn.Sequential`` (the ``ViT``'s MLPs);
    other architectures (residual connections in particular) raise a ``ValueError`` at fit start
    unless ``layers`` names the ``(incoming, [norm,] activation, outgoing)`` modules. Under DDP
    every rank measures its shard of the probe batch and the activities are averaged, so all
    ranks recycle the same units with the same draws.

    Logged under ``intervention/``: ``redo_dormant_fraction`` (over all units of the layers,
    before recycling) and ``redo_reset_units``; :attr:`history` keeps per-layer counts.

    Args:
        tau: dormancy threshold, ``>= 0``.
        every_n_train_steps: recycle after every this many optimizer steps (Sokar et al.
            recycle every 1000 gradient steps in their Atari experiments).
        on_task_start: recycle at the start of every ``every_n_tasks``-th task after the first.
        every_n_tasks: task frequency.
        probe_size: examples in the probe batch.
        layers: explicit ``(incoming, [norm,] activation, outgoing)`` module names relative to
            the LightningModule, or ``None`` to find them.
        reset_optimizer_state: zero the optimizer state of the recycled weights.
        loss_fn: ``loss_fn(pl_module, batch)`` that runs the forward pass on the probe batch
            (default: the module's ``plasticity_loss`` or ``training_step``).
        seed: base seed of the reinitialisations (default: rank 0's torch seed at fit start).

    Example::

        trainer = Trainer(callbacks=[ReDo(tau=0.025, every_n_train_steps=1000)])
        trainer.fit(model, datamodule=ContinualDataModule("digits", "permuted_labels"))
        trainer.callback_metrics["intervention/redo_dormant_fraction"]
    """

    seed_key = "redo"

    def __init__(self, tau: float = 0.025, every_n_train_steps: int | None = None,
                 on_task_start: bool = True, every_n_tasks: int = 1, probe_size: int = 256,
                 layers: Sequence[Sequence[str]] | None = None,
                 reset_optimizer_state: bool = True, loss_fn: ModuleLossFn | None = None,
                 seed: int | None = None) -> None:
        super().__init__(on_task_start=on_task_start, every_n_train_steps=every_n_train_steps,
                         every_n_tasks=every_n_tasks, seed=seed)
        if not tau >= 0:
            raise ValueError(f"ReDo: tau must be >= 0, got {tau}; 0 recycles only dead units, "
                             "Sokar et al. use 0.025.")
        if probe_size < 1:
            raise ValueError(f"ReDo: probe_size must be >= 1, got {probe_size}.")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError("ReDo: loss_fn must be callable(pl_module, batch).")
        self.tau, self.probe_size, self.loss_fn = float(tau), probe_size, loss_fn
        self.layer_names = [tuple(t) for t in layers] if layers is not None else None
        self.reset_optimizer_state = reset_optimizer_state
        #: the layers worked on (found at fit start)
        self.unit_layers: list[UnitLayer] = []
        #: one dict per recycling: ``task``, ``step``, ``event`` and the number of units
        #: ``dormant`` (and recycled) per layer
        self.history: list[dict[str, Any]] = []
        #: the units recycled by the latest recycling, per layer
        self.last_units: dict[str, list[int]] = {}
        self.num_reset_total = 0

    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "tau": self.tau}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.unit_layers = find_unit_layers(pl_module, self.layer_names)

    def dormant_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                      fallback: Any = None) -> list[Tensor]:
        """The dormant units of every layer on the probe batch (a mask per layer)."""
        activity: dict[int, Tensor] = {}
        handles: list[RemovableHandle] = []

        def make_hook(i: int, layer: UnitLayer) -> Any:
            def hook(module: Any, args: Any, output: Tensor) -> None:
                if i not in activity:  # the first call is the layer's own
                    activity[i] = unit_activity(output, layer.unit_dim)
            return hook

        try:
            for i, layer in enumerate(self.unit_layers):
                handles.append(layer.activation.register_forward_hook(make_hook(i, layer)))
            with measurement_context(pl_module), torch.no_grad():
                batch = select_probe_batch(trainer, pl_module, self.probe_size, fallback)
                module_loss(pl_module, batch, self.loss_fn)
        finally:
            for h in handles:
                h.remove()
        missing = [layer.names[2] for i, layer in enumerate(self.unit_layers)
                   if i not in activity]
        if missing:
            raise RuntimeError(f"ReDo: the activations {missing} were not called by the "
                               "module's forward pass on the probe batch; check layers=.")
        flat = torch.cat([activity[i] for i in range(len(self.unit_layers))])
        if trainer.world_size > 1:
            # Equal shards on every rank: the mean of the rank means is the whole batch's mean.
            flat = trainer.strategy.reduce(flat.clone(), reduce_op="mean")
        sizes = [layer.num_units * layer.multiplier for layer in self.unit_layers]
        return [dormant_units(a, self.tau, layer.multiplier)
                for a, layer in zip(flat.split(sizes), self.unit_layers)]

    @override
    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: str,
              batch: Any) -> None:
        fallback = first_examples(batch, self.probe_size) if batch is not None else None
        masks = self.dormant_masks(trainer, pl_module, fallback)
        step = trainer.global_step
        record: dict[str, Any] = {"task": int(getattr(trainer.datamodule, "task_id", 0) or 0),
                                  "step": step, "event": event, "dormant": {}}
        units = [mask.nonzero().flatten() for mask in masks]
        for layer, u in zip(self.unit_layers, units):
            record["dormant"][layer.name] = u.numel()
            self.last_units[layer.name] = u.tolist()
        seeds = [self.seed_for(event, step, i) for i in range(len(units))]
        touched = reinitialize_units(self.unit_layers, units, seeds)
        if self.reset_optimizer_state:
            reset_optimizer_entries(trainer, touched)
        total, dormant = sum(m.numel() for m in masks), sum(u.numel() for u in units)
        self.num_reset_total += dormant
        self.history.append(record)
        self.log_now(trainer, {"redo_dormant_fraction": dormant / max(total, 1),
                               "redo_reset_units": float(dormant)})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "num_reset_total": self.num_reset_total,
                "history": [dict(h) for h in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_reset_total = int(state_dict.get("num_reset_total", 0))
        self.history = [dict(h) for h in state_dict.get("history", [])]


__all__ = ["ReDo", "reset_optimizer_entries"]
