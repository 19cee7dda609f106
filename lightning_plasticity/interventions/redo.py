"""``ReDo``: recycle dormant units (Sokar et al., 2023) every N steps and/or at task starts.

Also home of the dormancy statistics, :func:`dormant_scores` and :func:`dormant_units`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_plasticity.callbacks.probe import (
    MeasurementSkipped,
    ModuleLossFn,
    ProbeSource,
    measurement_context,
    module_loss,
    select_probe_batch,
)
from lightning_plasticity.core.record import LayerCall, hooked
from lightning_plasticity.interventions.optimizer_state import reset_touched
from lightning_plasticity.interventions.schedule import ScheduledIntervention
from lightning_plasticity.interventions.surgery import (
    UnitLayer,
    find_unit_layers,
    reinitialize_units,
)

__all__ = ["ReDo", "dormant_scores", "dormant_units"]


def dormant_scores(activity: Tensor) -> Tensor:
    """Sokar et al.'s normalised activity ``s_i = a_i / ((1/K) sum_k a_k)`` of the K units.

    From "The Dormant Neuron Phenomenon in Deep Reinforcement Learning" (Sokar, Agarwal, Castro
    and Evci, ICML 2023), with ``a_i = E|h_i|`` from
    :func:`~lightning_plasticity.interventions.surgery.unit_activity`. A layer whose units are
    all exactly zero has scores of zero (every unit dormant) rather than ``0/0``.

    Args:
        activity: ``a``, one entry per unit of one layer.

    Returns:
        ``s``, same shape.

    Example:
        >>> import torch
        >>> dormant_scores(torch.tensor([2.0, 2.0, 0.0, 0.0]))
        tensor([2., 2., 0., 0.])
    """
    mean = activity.mean()
    if mean <= 0:
        return torch.zeros_like(activity)
    return activity / mean


def dormant_units(activity: Tensor, tau: float, multiplier: int = 1) -> Tensor:
    """Which units are tau-dormant: ``s_i <= tau`` (Sokar et al., 2023).

    ``tau = 0`` selects the units that are exactly zero on every input (dead ReLUs); Sokar et al.
    recycle with small positive thresholds such as ``0.025``. With ``multiplier > 1`` (CReLU) the
    scores are taken over the ``multiplier * num_units`` activation outputs and a unit is dormant
    when all its copies are.

    Args:
        activity: ``a``, ``multiplier * num_units`` entries (activation outputs).
        tau: The threshold, ``>= 0``.
        multiplier: Activation outputs per unit.

    Returns:
        A boolean mask of ``num_units`` entries.

    Example:
        >>> import torch
        >>> dormant_units(torch.tensor([1.0, 0.01, 0.0, 2.99]), tau=0.025)
        tensor([False,  True,  True, False])
    """
    if tau < 0:
        raise ValueError(f"dormant_units: tau must be >= 0, got {tau}.")
    mask = dormant_scores(activity) <= tau
    return mask.reshape(multiplier, -1).all(dim=0)


class ReDo(ScheduledIntervention):
    """Recycle dormant units: reinitialise their incoming weights, zero their outgoing weights.

    Sokar, Agarwal, Castro and Evci (ICML 2023, "The dormant neuron phenomenon in deep
    reinforcement learning") call unit ``i`` of a layer with ``K`` units tau-dormant when

        ``s_i = E|h_i| / ((1/K) sum_k E|h_k|) <= tau``

    with the expectation over a batch of inputs (and over the positions of a conv feature map).
    Every ``every_n_train_steps`` steps and/or at task starts this callback computes ``s`` on a
    probe batch, by running the module's own loss (``loss_fn``, else its ``plasticity_loss``,
    else its ``training_step``) once with forward hooks, in eval mode and without side effects
    (parameters, buffers, optimizer state and RNG streams are restored). The probe batch is
    ``trainer.datamodule.probe_batch(probe_size)`` with a ContinualDataModule, else the first
    ``probe_size`` training examples (any batch structure: tuples, dicts, nested). Then, for
    every dormant unit of every hidden layer, it

    * redraws its incoming weights (the unit's row of the preceding ``Linear``/``Conv`` and its
      bias entry, and its entries of a per-unit norm in between) from the layer's own
      initialisation, with a seed from :meth:`seed_for` (the global RNG streams are untouched);
    * sets its outgoing weights (its columns of the next ``Linear``/``Conv``) to zero, so the
      network's function does not change;
    * zeroes the optimizer state (Adam's ``exp_avg`` and ``exp_avg_sq``, momentum buffers) of
      exactly those rows and columns in every optimizer of ``trainer.optimizers`` that holds
      them. Without this the stale moments push recycled units straight back to dormancy, as
      users of implementations without it reported. (PyTorch's Adam keeps one ``step`` per
      tensor, see
      :func:`~lightning_plasticity.interventions.optimizer_state.reset_state_entries`.)

    Every other weight and state entry stays bit-identical. ``tau = 0`` recycles only units that
    are exactly zero on every probe input (dead ReLUs); Sokar et al. use ``tau = 0.025`` for most
    of their experiments (and ``0.1`` in some), the default here.

    Only trainable parameters are written: a layer whose incoming weight is frozen
    (``requires_grad=False``) is left alone, and so is one whose outgoing weight is frozen (its
    units cannot be recycled without changing the network's function; said once in a warning).

    Layers: found by :func:`~lightning_plasticity.interventions.surgery.find_unit_layers` in the
    package's ``MLP``, ``CNN``, ``ResNet18`` (inside residual blocks) and in ``Linear``/``Conv``
    -> activation -> ``Linear``/``Conv`` chains of any ``nn.Sequential`` (the ``ViT``'s MLPs);
    other architectures (residual connections in particular) raise a ``ValueError`` at fit start
    unless ``layers`` names the ``(incoming, [norm,] activation, outgoing)`` modules, or
    ``(incoming, outgoing)`` for a functional activation (``F.relu``), whose units are then read
    from the outgoing layer's input. Under DDP every rank measures its shard of the probe batch
    and the activities are averaged, so all ranks recycle the same units with the same draws.

    A manual-optimization module's ``training_step`` steps its optimizers, so it cannot be run
    for the probe: such a module needs a ``plasticity_loss(batch)`` method or ``loss_fn``;
    without one ReDo says so once in a warning and does nothing (training goes on unchanged).

    Logged under ``intervention/``: ``redo_dormant_fraction`` (over all units of the layers,
    before recycling) and ``redo_reset_units``; :attr:`history` keeps per-layer counts.

    Args:
        tau: dormancy threshold, ``>= 0``.
        every_n_train_steps: recycle after every this many optimizer steps (Sokar et al.
            recycle every 1000 gradient steps in their Atari experiments).
        on_task_start: recycle at the start of every ``every_n_tasks``-th task after the first.
        every_n_tasks: task frequency.
        probe_size: examples in the probe batch.
        layers: explicit ``(incoming, [[norm,] activation,] outgoing)`` module names relative to
            the LightningModule, or ``None`` to find them.
        reset_optimizer_state: zero the optimizer state of the recycled weights.
        loss_fn: ``loss_fn(pl_module, batch)`` that runs the forward pass on the probe batch
            (default: the module's ``plasticity_loss`` or ``training_step``).
        seed: base seed of the reinitialisations (default: rank 0's torch seed at fit start).

    Example:
        A network with ``F.relu`` and four dead units (zero weights, negative bias):

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> class Net(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc1, self.fc2 = nn.Linear(5, 16), nn.Linear(16, 2)
        ...         with torch.no_grad():
        ...             self.fc1.weight[:4] = 0.0
        ...             self.fc1.bias[:4] = -1.0
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return F.cross_entropy(self.fc2(F.relu(self.fc1(x))), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.Adam(self.parameters(), lr=1e-3)
        >>> data = torch.utils.data.TensorDataset(torch.randn(64, 5), torch.randint(0, 2, (64,)))
        >>> redo = ReDo(tau=0.0, every_n_train_steps=2, on_task_start=False,
        ...             layers=[("fc1", "fc2")], seed=0)
        >>> trainer = pl.Trainer(max_steps=2, callbacks=[redo], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=16))
        >>> redo.last_units
        {'fc1': [0, 1, 2, 3]}
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
        self.source = ProbeSource(probe_size)

    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "tau": self.tau}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.unit_layers = find_unit_layers(pl_module, self.layer_names)
        self.source = ProbeSource(self.probe_size)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if not callable(getattr(trainer.datamodule, "probe_batch", None)):
            self.source.observe(batch)

    def usable_layers(self) -> list[tuple[int, UnitLayer]]:
        """``(index, layer)`` of the layers whose units can be recycled now (not frozen)."""
        usable = []
        for i, layer in enumerate(self.unit_layers):
            frozen = layer.frozen()
            if frozen == "outgoing":
                self._warn_once(f"the outgoing layer {layer.names[3]!r} of unit layer "
                                f"{layer.name!r} is frozen, so its units cannot be recycled "
                                "without changing the network's function; the layer is skipped")
            elif frozen is None:
                usable.append((i, layer))
        return usable

    def dormant_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                      layers: Sequence[UnitLayer] | None = None) -> list[Tensor]:
        """The dormant units of every layer (default: all) on the probe batch, a mask per layer.

        Raises:
            MeasurementSkipped: If there is no probe batch, or the module's loss cannot be run
                for a measurement (manual optimization without ``plasticity_loss``/``loss_fn``).
        """
        layers = list(self.unit_layers if layers is None else layers)
        by_name = {layer.observed_name: layer for layer in layers}
        activity: dict[str, Tensor] = {}

        def on_call(call: LayerCall) -> None:
            if call.index == 0:  # the first call is the layer's own
                a = by_name[call.name].activity(call)
                if a is not None:
                    activity[call.name] = a

        with measurement_context(pl_module, trainer), torch.no_grad():
            batch = select_probe_batch(trainer, pl_module, self.probe_size, self.source,
                                       note=self._warn_once)
            with hooked({n: layer.observed_module for n, layer in by_name.items()}, on_call):
                module_loss(pl_module, batch, self.loss_fn)
        missing = [name for name in by_name if name not in activity]
        if missing:
            raise RuntimeError(f"ReDo: the modules {missing} were not called by the module's "
                               "loss on the probe batch; check layers=.")
        flat = torch.cat([activity[layer.observed_name] for layer in layers])
        if trainer.world_size > 1:
            # Equal shards on every rank: the mean of the rank means is the whole batch's mean.
            flat = trainer.strategy.reduce(flat.clone(), reduce_op="mean")
        sizes = [layer.num_units * layer.multiplier for layer in layers]
        return [dormant_units(a, self.tau, layer.multiplier)
                for a, layer in zip(flat.split(sizes), layers)]

    @override
    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: str,
              batch: Any) -> bool:
        usable = self.usable_layers()
        if not usable:
            self._warn_once("every unit layer has a frozen incoming or outgoing weight; "
                            "nothing to recycle")
            return False
        indices, layers = [i for i, _ in usable], [layer for _, layer in usable]
        try:
            masks = self.dormant_masks(trainer, pl_module, layers)
        except MeasurementSkipped as err:
            self._warn_once(f"cannot measure dormancy, so no units are recycled: {err}")
            return False
        step = trainer.global_step
        record: dict[str, Any] = {"task": int(getattr(trainer.datamodule, "task_id", 0) or 0),
                                  "step": step, "event": event, "dormant": {}}
        units = [mask.nonzero().flatten() for mask in masks]
        for layer, u in zip(layers, units):
            record["dormant"][layer.name] = u.numel()
            self.last_units[layer.name] = u.tolist()
        seeds = [self.seed_for(event, step, i) for i in indices]
        touched = reinitialize_units(layers, units, seeds)
        if self.reset_optimizer_state:
            reset_touched(trainer.optimizers, touched)
        total, dormant = sum(m.numel() for m in masks), sum(u.numel() for u in units)
        self.num_reset_total += dormant
        self.history.append(record)
        self.log_now(trainer, {"redo_dormant_fraction": dormant / max(total, 1),
                               "redo_reset_units": float(dormant)})
        return True

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "num_reset_total": self.num_reset_total,
                "history": [dict(h) for h in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_reset_total = int(state_dict.get("num_reset_total", 0))
        self.history = [dict(h) for h in state_dict.get("history", [])]
