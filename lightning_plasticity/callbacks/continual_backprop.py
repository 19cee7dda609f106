"""``ContinualBackprop``: replace a small fraction of low-utility mature units every step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_plasticity.callbacks.redo import reset_optimizer_entries
from lightning_plasticity.callbacks.shrink_and_perturb import SeededIntervention
from lightning_plasticity.measures.unit_utility import (
    UnitLayer,
    bias_corrected,
    contribution_utility,
    ema_update,
    find_unit_layers,
    lowest_utility_units,
    reinitialize_units,
    replacement_count,
    unit_activity,
)


class ContinualBackprop(SeededIntervention):
    """Continual backpropagation (Dohare et al., Nature 2024, "Loss of plasticity in deep
    continual learning"): keep injecting fresh units so the network stays trainable.

    For every hidden unit ``i`` of a layer, after every optimizer step:

    * its *contribution utility* on the step's batch, ``c_i = E|h_i| * sum_k |w_ki|`` (mean
      absolute activation times the absolute outgoing weights, see
      :func:`~lightning_plasticity.measures.unit_utility.contribution_utility`), is averaged
      with decay ``eta``: ``u_i <- eta * u_i + (1 - eta) * c_i``, and bias-corrected with the
      unit's age ``a_i`` (updates since it was initialised): ``u_hat_i = u_i / (1 - eta**a_i)``;
    * units with ``a_i > maturity_threshold`` are *mature*; each layer accrues a fractional
      budget of ``replacement_rate * num_mature`` units per step (nothing while no unit is
      mature) and replaces ``floor(budget)`` of its mature units of lowest ``u_hat``, never more
      than its mature units and never all its units at once (the whole part of the budget is
      spent either way; see
      :func:`~lightning_plasticity.measures.unit_utility.replacement_count`);
    * a replaced unit gets fresh incoming weights drawn from the layer's own initialisation
      (seeded by :meth:`seed_for`; the global RNG streams are untouched), zero outgoing
      weights (the network's function does not change), zeroed optimizer state for exactly those
      rows and columns, and ``u_i = a_i = 0``.

    The activations are captured by forward hooks on the activation modules during the normal
    training forward pass (no extra forward pass; only the per-unit means are kept) and used in
    ``on_train_batch_end``, after the optimizer step. With gradient accumulation, the batch that
    completes a step is used. Layers are found as for
    :class:`~lightning_plasticity.callbacks.redo.ReDo`
    (the package's MLP, CNN, ResNet18 blocks, ``nn.Sequential`` chains, or explicit ``layers``).
    Under DDP every rank keeps its own average of its own batches (averages are linear, so their
    mean over ranks is the average of the mean) and the utilities are averaged across ranks when
    a layer replaces units; ages and budgets are the same on every rank, so all ranks replace the
    same units with the same draws.

    Differences from the reference code: the new units' biases are drawn from the layer's
    initialisation (the reference zeroes them), the outgoing layer's bias is not adjusted for the
    removed units' mean activation, and PyTorch's Adam has a single step count per tensor (see
    :func:`~lightning_plasticity.callbacks.optimizer_state.reset_state_entries`).

    Logged under ``intervention/``: ``cbp_replaced_units`` (the total so far) whenever units are
    replaced.

    Args:
        replacement_rate: replacements per mature unit per step (``rho``; the paper uses
            ``1e-4`` to ``1e-5``), ``>= 0``.
        maturity_threshold: steps a unit is protected after (re)initialisation (``m = 100``).
        decay_rate: the utility average's decay ``eta`` in ``[0, 1)`` (``0.99``).
        layers: explicit ``(incoming, [norm,] activation, outgoing)`` module names relative to
            the LightningModule, or ``None`` to find them.
        reset_optimizer_state: zero the optimizer state of the replaced weights.
        seed: base seed of the new units' weights (default: rank 0's torch seed at fit start).

    Example::

        trainer = Trainer(callbacks=[ContinualBackprop(replacement_rate=1e-4)])
        trainer.fit(model, datamodule=ContinualDataModule("digits", "permuted_labels"))
        trainer.callback_metrics["intervention/cbp_replaced_units"]
    """

    seed_key = "continual_backprop"

    def __init__(self, replacement_rate: float = 1e-4, maturity_threshold: int = 100,
                 decay_rate: float = 0.99, layers: Sequence[Sequence[str]] | None = None,
                 reset_optimizer_state: bool = True, seed: int | None = None) -> None:
        super().__init__(seed=seed)
        if not (replacement_rate >= 0 and math.isfinite(replacement_rate)):
            raise ValueError(f"ContinualBackprop: replacement_rate must be a finite number >= 0 "
                             f"(replacements per mature unit per step), got {replacement_rate}; "
                             "Dohare et al. use 1e-4.")
        if isinstance(maturity_threshold, bool) or not isinstance(maturity_threshold, int) \
                or maturity_threshold < 0:
            raise ValueError(f"ContinualBackprop: maturity_threshold must be an int >= 0 (steps), "
                             f"got {maturity_threshold!r}; Dohare et al. use 100.")
        if not 0.0 <= decay_rate < 1.0:
            raise ValueError(f"ContinualBackprop: decay_rate must be in [0, 1), got "
                             f"{decay_rate}; Dohare et al. use 0.99.")
        self.replacement_rate, self.maturity_threshold = float(replacement_rate), maturity_threshold
        self.decay_rate = float(decay_rate)
        self.layer_names = [tuple(t) for t in layers] if layers is not None else None
        self.reset_optimizer_state = reset_optimizer_state
        #: the layers worked on (found at fit start)
        self.unit_layers: list[UnitLayer] = []
        #: per layer: the utility moving average ``u`` (not bias-corrected)
        self.utility: dict[str, Tensor] = {}
        #: per layer: the units' ages in steps
        self.ages: dict[str, Tensor] = {}
        #: per layer: the fractional replacement budget
        self.budget: dict[str, float] = {}
        #: per layer: units replaced so far
        self.num_replaced: dict[str, int] = {}
        #: per layer: the units replaced at the latest replacement
        self.last_replaced: dict[str, list[int]] = {}
        self._loaded: dict[str, Any] | None = None
        self._handles: list[RemovableHandle] = []
        self._captured: dict[str, Tensor] = {}
        self._capturing = False
        self._last_step = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(replacement_rate=self.replacement_rate,
                                        maturity_threshold=self.maturity_threshold,
                                        decay_rate=self.decay_rate)

    def bias_corrected_utility(self, name: str) -> Tensor:
        """``u_hat = u / (1 - eta**age)`` of the layer ``name`` (its incoming module's name)."""
        return bias_corrected(self.utility[name], self.ages[name], self.decay_rate)

    # ------------------------------------------------------------------ set-up
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._remove_hooks()
        self.unit_layers = find_unit_layers(pl_module, self.layer_names)
        for layer in self.unit_layers:
            device = layer.incoming.weight.device
            fresh = (layer.name not in self.utility
                     or self.utility[layer.name].shape != (layer.num_units,))
            if fresh:
                self.utility[layer.name] = torch.zeros(layer.num_units, device=device)
                self.ages[layer.name] = torch.zeros(layer.num_units, dtype=torch.long,
                                                    device=device)
                self.budget[layer.name] = 0.0
                self.num_replaced[layer.name] = 0
        if self._loaded is not None:
            self._apply_loaded(self._loaded)
            self._loaded = None
        for layer in self.unit_layers:
            self._handles.append(layer.activation.register_forward_hook(self._hook(layer)))

    def _hook(self, layer: UnitLayer) -> Any:
        # A closure, not a bound method: deep copies of the model (fresh initialisations) copy
        # forward hooks, and a bound method would drag this callback along.
        captured, name, unit_dim, owner = self._captured, layer.name, layer.unit_dim, self

        def hook(module: Any, args: Any, output: Tensor) -> None:
            # The first call in a training batch is the training forward; later ones (another
            # callback's probe) and eval-mode calls are not.
            if owner._capturing and module.training and name not in captured:
                captured[name] = unit_activity(output, unit_dim)

        return hook

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._capturing = False

    # ------------------------------------------------------------------ every step
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the checkpoint's training state is restored: the step counting starts here.
        self._last_step = trainer.global_step

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._captured.clear()
        self._capturing = True

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._capturing = False
        step = trainer.global_step
        if step <= self._last_step:  # no optimizer step since the last update
            return
        self._last_step = step
        self.update(trainer)
        self._captured.clear()

    def update(self, trainer: pl.Trainer) -> None:
        """One continual-backprop step: :meth:`update_utilities`, then :meth:`replace_units`."""
        counts = self.update_utilities()
        if counts:
            self.replace_units(trainer, counts)

    @torch.no_grad()
    def update_utilities(self) -> dict[int, int]:
        """Age the units, update their utilities with the captured activations and budgets.

        Returns:
            How many units to replace, by layer index (layers with none are left out).
        """
        counts: dict[int, int] = {}
        for i, layer in enumerate(self.unit_layers):
            activity = self._captured.get(layer.name)
            if activity is None:
                self._warn_once(f"the activation {layer.names[2]!r} was not called in a "
                                "training step; its layer is skipped on such steps")
                continue
            instant = contribution_utility(activity, layer.outgoing_magnitude(),
                                           layer.multiplier)
            name = layer.name
            self.ages[name] += 1
            self.utility[name] = ema_update(self.utility[name], instant.to(self.utility[name]),
                                            self.decay_rate)
            mature = int((self.ages[name] > self.maturity_threshold).sum())
            count, self.budget[name] = replacement_count(self.budget[name],
                                                         self.replacement_rate, mature,
                                                         layer.num_units)
            if count > 0:
                counts[i] = count
        return counts

    @torch.no_grad()
    def replace_units(self, trainer: pl.Trainer, counts: dict[int, int]) -> None:
        """Replace ``counts[i]`` mature units of lowest bias-corrected utility in layer ``i``."""
        if trainer.world_size > 1:
            # Every rank has the same ages and budgets, hence the same counts: safe collective.
            names = [self.unit_layers[i].name for i in counts]
            flat = torch.cat([self.utility[n] for n in names])
            flat = trainer.strategy.reduce(flat.clone(), reduce_op="mean")
            for n, u in zip(names, flat.split([self.utility[n].numel() for n in names])):
                self.utility[n] = u
        step = trainer.global_step
        layers = [self.unit_layers[i] for i in counts]
        chosen = [lowest_utility_units(self.bias_corrected_utility(layer.name),
                                       self.ages[layer.name] > self.maturity_threshold, count)
                  for layer, count in zip(layers, counts.values())]
        touched = reinitialize_units(layers, chosen, [self.seed_for(step, i) for i in counts])
        if self.reset_optimizer_state:
            reset_optimizer_entries(trainer, touched)
        for layer, units in zip(layers, chosen):
            name = layer.name
            self.utility[name][units] = 0.0
            self.ages[name][units] = 0
            self.num_replaced[name] += units.numel()
            self.last_replaced[name] = units.tolist()
        self.log_now(trainer, {"cbp_replaced_units": float(sum(self.num_replaced.values()))})

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(),
                "utility": {k: v.detach().cpu().clone() for k, v in self.utility.items()},
                "ages": {k: v.detach().cpu().clone() for k, v in self.ages.items()},
                "budget": dict(self.budget), "num_replaced": dict(self.num_replaced)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.unit_layers:
            self._apply_loaded(state_dict)
        else:  # restored before fit start: applied once the layers are known
            self._loaded = dict(state_dict)

    def _apply_loaded(self, state: dict[str, Any]) -> None:
        for layer in self.unit_layers:
            name = layer.name
            if name not in state.get("utility", {}):
                continue
            utility, ages = state["utility"][name], state["ages"][name]
            if utility.shape != (layer.num_units,):
                raise ValueError(f"ContinualBackprop: the checkpoint has {utility.numel()} "
                                 f"utilities for layer {name!r}, which has {layer.num_units} "
                                 "units.")
            device = layer.incoming.weight.device
            self.utility[name] = utility.to(device, torch.float32).clone()
            self.ages[name] = ages.to(device, torch.long).clone()
            self.budget[name] = float(state["budget"][name])
            self.num_replaced[name] = int(state.get("num_replaced", {}).get(name, 0))


__all__ = ["ContinualBackprop"]
