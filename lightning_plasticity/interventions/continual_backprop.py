"""``ContinualBackprop``: replace a small fraction of low-utility mature units every step.

Also home of continual backprop's per-unit statistics: the contribution utility, its moving
average with bias correction, the replacement budget and the choice of the units to replace.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_plasticity.core.record import LayerCall, hooked
from lightning_plasticity.interventions.optimizer_state import reset_touched
from lightning_plasticity.interventions.schedule import SeededIntervention
from lightning_plasticity.interventions.surgery import (
    UnitLayer,
    find_unit_layers,
    reinitialize_units,
)

__all__ = [
    "ContinualBackprop",
    "bias_corrected",
    "contribution_utility",
    "ema_update",
    "lowest_utility_units",
    "replacement_count",
]


def contribution_utility(activity: Tensor, outgoing_magnitude: Tensor,
                         multiplier: int = 1) -> Tensor:
    """Dohare et al.'s contribution utility of every unit on one batch.

    ``u_i = E|h_i| * sum_k |w_ki|``: how much unit ``i`` contributes to the next layer, where
    ``w_ki`` are its outgoing weights (Dohare, Hernandez-Garcia, Lan, Rahman, Mahmood and Sutton,
    "Loss of plasticity in deep continual learning", Nature 2024). Their reference code uses the
    mean instead of the sum over ``k``; within a layer, where units are compared, the two rank
    units identically. With ``multiplier > 1`` (CReLU) the copies' contributions are added.

    Args:
        activity: ``E|h|`` per activation output, ``multiplier * num_units`` entries.
        outgoing_magnitude: ``sum_k |w_k.|`` per activation output, same shape (see
            :meth:`~lightning_plasticity.interventions.surgery.UnitLayer.outgoing_magnitude`).
        multiplier: Activation outputs per unit.

    Returns:
        ``num_units`` utilities.

    Example:
        >>> import torch
        >>> contribution_utility(torch.tensor([1.0, 0.5]), torch.tensor([2.0, 4.0]))
        tensor([2., 2.])
    """
    return (activity * outgoing_magnitude).reshape(multiplier, -1).sum(dim=0)


def ema_update(average: Tensor, value: Tensor, decay: float) -> Tensor:
    """One step of an exponential moving average: ``decay * average + (1 - decay) * value``.

    Started from zero, after ``a`` steps it is biased towards zero by the factor ``1 - decay**a``,
    which :func:`bias_corrected` removes.
    """
    return decay * average + (1.0 - decay) * value


def bias_corrected(average: Tensor, ages: Tensor, decay: float) -> Tensor:
    """Bias-corrected moving average ``u_hat = u / (1 - decay**a)`` (zero where ``a = 0``).

    Dohare et al. (Nature 2024) correct each unit's utility with its own age ``a_i``, the number
    of moving-average updates since the unit was (re)initialised, as Adam corrects its moments.
    A value that stayed ``x`` for ``a`` updates has ``u_hat = x`` exactly.

    Args:
        average: ``u`` per unit.
        ages: ``a`` per unit (integers ``>= 0``).
        decay: The moving-average decay ``eta`` in ``[0, 1)``.

    Returns:
        ``u_hat`` per unit.

    Example:
        >>> import torch
        >>> u = ema_update(ema_update(torch.zeros(1), torch.ones(1), 0.9), torch.ones(1), 0.9)
        >>> torch.allclose(bias_corrected(u, torch.tensor([2]), 0.9), torch.ones(1))
        True
    """
    correction = 1.0 - torch.pow(torch.full_like(average, decay), ages.to(average.dtype))
    return torch.where(ages > 0, average / correction.clamp_min(torch.finfo(average.dtype).tiny),
                       torch.zeros_like(average))


def replacement_count(budget: float, replacement_rate: float, num_mature: int,
                      num_units: int) -> tuple[int, float]:
    """How many units continual backprop replaces in one layer at one step, and the new budget.

    The budget grows by ``replacement_rate * num_mature`` per step (nothing while no unit is
    mature) and ``floor(budget)`` units are replaced, but never more than ``num_mature`` and never
    all ``num_units`` units of the layer at once. The whole part of the budget is spent either
    way, so a capped step does not build up a backlog; the fractional part carries over.

    Args:
        budget: The layer's accumulated fractional budget.
        replacement_rate: Replacements per mature unit per step (Dohare et al.'s ``rho``).
        num_mature: Units older than the maturity threshold.
        num_units: Units of the layer.

    Returns:
        ``(count, new_budget)``.

    Example:
        >>> replacement_count(0.5, 0.01, 100, 128)
        (1, 0.5)
    """
    budget = budget + replacement_rate * num_mature
    whole = math.floor(budget)
    count = max(0, min(whole, num_mature, num_units - 1))
    return count, budget - whole


def lowest_utility_units(utility: Tensor, eligible: Tensor, count: int) -> Tensor:
    """The ``count`` eligible units of lowest utility (ties: lower index first).

    Args:
        utility: Utility per unit.
        eligible: Boolean mask of the units that may be chosen (the mature ones).
        count: How many to choose; at most ``eligible.sum()``.

    Returns:
        Sorted indices (``int64``).

    Example:
        >>> import torch
        >>> utility, mature = torch.tensor([0.5, 0.1, 0.0]), torch.tensor([True, True, False])
        >>> lowest_utility_units(utility, mature, 1)
        tensor([1])
    """
    count = min(count, int(eligible.sum()))
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=utility.device)
    masked = torch.where(eligible, utility, torch.full_like(utility, math.inf))
    chosen = torch.sort(masked, stable=True).indices[:count]
    return chosen.sort().values


class ContinualBackprop(SeededIntervention):
    """Continual backpropagation (Dohare et al., Nature 2024, "Loss of plasticity in deep
    continual learning"): keep injecting fresh units so the network stays trainable.

    For every hidden unit ``i`` of a layer, after every optimizer step:

    * its *contribution utility* on the step's batch, ``c_i = E|h_i| * sum_k |w_ki|`` (mean
      absolute activation times the absolute outgoing weights, see
      :func:`contribution_utility`), is averaged
      with decay ``eta``: ``u_i <- eta * u_i + (1 - eta) * c_i``, and bias-corrected with the
      unit's age ``a_i`` (updates since it was initialised): ``u_hat_i = u_i / (1 - eta**a_i)``;
    * units with ``a_i > maturity_threshold`` are *mature*; each layer accrues a fractional
      budget of ``replacement_rate * num_mature`` units per step (nothing while no unit is
      mature) and replaces ``floor(budget)`` of its mature units of lowest ``u_hat``, never more
      than its mature units and never all its units at once (the whole part of the budget is
      spent either way; see :func:`replacement_count`);
    * a replaced unit gets fresh incoming weights drawn from the layer's own initialisation
      (seeded by :meth:`seed_for`; the global RNG streams are untouched), zero outgoing
      weights (the network's function does not change), zeroed optimizer state for exactly those
      rows and columns, and ``u_i = a_i = 0``.

    The activations are captured by forward hooks (:func:`~lightning_plasticity.core.record.
    hooked`, in place only from ``on_train_batch_start`` to ``on_train_batch_end``) on the
    activation modules, or on the outgoing layer's input for a functional activation, during the
    normal training forward pass (no extra forward pass; only the per-unit means are kept) and
    used in ``on_train_batch_end``, after the optimizer step. With gradient accumulation, the
    batch that completes a step is used. Layers are found as for
    :class:`~lightning_plasticity.interventions.redo.ReDo` (the package's MLP, CNN, ResNet18
    blocks, ``nn.Sequential`` chains, or explicit ``layers``, ``(incoming, outgoing)`` for
    ``F.relu``). Only trainable parameters are written: a layer whose incoming weight is frozen
    is left alone, and so is one whose outgoing weight is frozen (said once in a warning).
    Replaced weights have their state zeroed in every optimizer of ``trainer.optimizers``.
    Under DDP every rank keeps its own average of its own batches (averages are linear, so their
    mean over ranks is the average of the mean) and the utilities are averaged across ranks when
    a layer replaces units; ages and budgets are the same on every rank, so all ranks replace the
    same units with the same draws.

    Differences from the reference code: the new units' biases are drawn from the layer's
    initialisation (the reference zeroes them), the outgoing layer's bias is not adjusted for the
    removed units' mean activation, and PyTorch's Adam has a single step count per tensor (see
    :func:`~lightning_plasticity.interventions.optimizer_state.reset_state_entries`).

    Logged under ``intervention/``: ``cbp_replaced_units`` (the total so far) whenever units are
    replaced.

    Args:
        replacement_rate: replacements per mature unit per step (``rho``; the paper uses
            ``1e-4`` to ``1e-5``), ``>= 0``.
        maturity_threshold: steps a unit is protected after (re)initialisation (``m = 100``).
        decay_rate: the utility average's decay ``eta`` in ``[0, 1)`` (``0.99``).
        layers: explicit ``(incoming, [[norm,] activation,] outgoing)`` module names relative
            to the LightningModule, or ``None`` to find them.
        reset_optimizer_state: zero the optimizer state of the replaced weights.
        seed: base seed of the new units' weights (default: rank 0's torch seed at fit start).

    Example:
        With a high rate and an early maturity, units are replaced within a few steps (the
        counts depend only on the rate and the units' ages: 16 units mature after step 3 give a
        budget of 1.6, one is replaced; 15 mature ones add 1.5 at step 4, two more):

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> class Net(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2))
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return F.cross_entropy(self.net(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = torch.utils.data.TensorDataset(torch.randn(64, 5), torch.randint(0, 2, (64,)))
        >>> cbp = ContinualBackprop(replacement_rate=0.1, maturity_threshold=2, seed=0)
        >>> trainer = pl.Trainer(max_steps=4, callbacks=[cbp], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=16))
        >>> cbp.num_replaced
        {'net.0': 3}
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
        self._hooks: contextlib.ExitStack | None = None
        self._captured: dict[str, Tensor] = {}
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

    def _on_call(self) -> Any:
        # A closure, not a bound method: deep copies of the model made while the hooks are in
        # place copy them, and a bound method would drag this callback along.
        captured = self._captured
        layers = {layer.observed_name: layer for layer in self.unit_layers}

        def on_call(call: LayerCall) -> None:
            # The first train-mode call in a training batch is the training forward; later ones
            # (another callback's probe) and eval-mode calls are not.
            if call.module.training and call.name not in captured:
                activity = layers[call.name].activity(call)
                if activity is not None:
                    captured[call.name] = activity

        return on_call

    def _remove_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.close()
            self._hooks = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------ every step
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the checkpoint's training state is restored: the step counting starts here.
        self._last_step = trainer.global_step

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._remove_hooks()
        self._captured.clear()
        modules = {layer.observed_name: layer.observed_module for layer in self.unit_layers}
        self._hooks = contextlib.ExitStack()
        self._hooks.enter_context(hooked(modules, self._on_call()))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._remove_hooks()
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

        Layers with a frozen incoming or outgoing weight are skipped (not aged).

        Returns:
            How many units to replace, by layer index (layers with none are left out).
        """
        counts: dict[int, int] = {}
        for i, layer in enumerate(self.unit_layers):
            frozen = layer.frozen()
            if frozen == "outgoing":
                self._warn_once(f"the outgoing layer {layer.names[3]!r} of unit layer "
                                f"{layer.name!r} is frozen, so its units cannot be replaced "
                                "without changing the network's function; the layer is skipped")
            if frozen is not None:
                continue
            activity = self._captured.get(layer.observed_name)
            if activity is None:
                self._warn_once(f"the module {layer.observed_name!r} was not called in a "
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
            reset_touched(trainer.optimizers, touched)
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

