"""``ResetLayers``: reinitialise named layers and/or reset the optimizer state at task starts."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from torch import nn
from torch.nn.utils import parametrize
from typing_extensions import override

from lightning_plasticity.callbacks.optimizer_state import reset_parameter_state
from lightning_plasticity.callbacks.shrink_and_perturb import ScheduledIntervention
from lightning_plasticity.measures.unit_utility import fresh_initialization

# How many layer names an error message lists before eliding the rest.
_MAX_NAMES = 30


def _parameterised_layers(pl_module: nn.Module) -> list[str]:
    return [n for n, m in pl_module.named_modules()
            if n and any(True for _ in m.parameters(recurse=False))]


def default_last_layer(pl_module: nn.Module) -> str:
    """The read-out layer's name: the first ``head`` of a (sub)module (``"network.head"`` for
    the package's modules), else the last module that owns parameters."""
    for name, module in pl_module.named_modules():
        head = getattr(module, "head", None)
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return f"{name}.head" if name else "head"
    layers = _parameterised_layers(pl_module)
    if not layers:
        raise ValueError(f"ResetLayers: {type(pl_module).__name__} has no layer with parameters.")
    return layers[-1]


class ResetLayers(ScheduledIntervention):
    """Reinitialise layers and/or forget the optimizer state at the start of every task.

    Lyle et al. (ICML 2023, "Understanding plasticity in neural networks") test both as
    interventions against plasticity loss: resetting the last layer (the network's read-out,
    a cheap way to restore a trainable head; Nikishin et al., 2022, "The primacy bias in deep
    reinforcement learning", reset the last layers of RL agents periodically) and resetting
    the optimizer state (Adam's moment estimates are tuned to the previous task).

    * ``reset_layers``: every named layer is reinitialised as at construction
      (``reset_parameters()`` of it and its submodules, drawn from :meth:`seed_for` so the
      global RNG streams are not consumed; BatchNorm statistics included). The optimizer state
      of the reset parameters is dropped too: moments estimated for the old weights mean
      nothing for the new ones. Nothing else changes.
    * ``reset_optimizer``: the state of *every* parameter is dropped; the optimizer starts over
      (for Adam: zero moments and a fresh bias correction) at the next step.

    Layer names are checked at fit start: a name (or fnmatch pattern) matching no module is a
    ``ValueError`` listing the layers there are. Task ``0`` is never reset.

    Args:
        layers: module names or fnmatch patterns, relative to the LightningModule
            (``"network.head"``, ``"network.layers.*"``); ``None``: the last layer, i.e. the
            network's ``head`` or else the last module that owns parameters.
        reset_layers: reinitialise the layers.
        reset_optimizer: drop the whole optimizer state (``trainer.optimizers[0]``).
        every_n_tasks: act at the start of every this many tasks.
        seed: base seed of the reinitialisations (default: rank 0's torch seed at fit start).

    Example::

        # Lyle et al.'s two interventions at every task switch:
        trainer = Trainer(callbacks=[ResetLayers(reset_optimizer=True)])
        trainer.fit(model, datamodule=ContinualDataModule("digits", "permuted_labels"))
        ResetLayers(layers=["network.head", "network.layers.1.linear"])
        ResetLayers(reset_layers=False, reset_optimizer=True)  # the optimizer only
    """

    seed_key = "reset_layers"

    def __init__(self, layers: Sequence[str] | None = None, reset_layers: bool = True,
                 reset_optimizer: bool = False, every_n_tasks: int = 1,
                 seed: int | None = None) -> None:
        super().__init__(on_task_start=True, every_n_tasks=every_n_tasks, seed=seed)
        if not (reset_layers or reset_optimizer):
            raise ValueError("ResetLayers would do nothing: set reset_layers=True and/or "
                             "reset_optimizer=True.")
        if isinstance(layers, str):
            raise ValueError(f"ResetLayers: layers must be a list of names, e.g. "
                             f"[{layers!r}], not a string.")
        if layers is not None:
            if not layers or not all(isinstance(n, str) and n for n in layers):
                raise ValueError(f"ResetLayers: layers must be a non-empty list of module "
                                 f"names, or None for the last layer; got {layers!r}.")
            if not reset_layers:
                raise ValueError("ResetLayers: layers are only used with reset_layers=True; "
                                 "reset_optimizer=True resets the state of all parameters.")
        self.layers = list(layers) if layers is not None else None
        self.reset_layers, self.reset_optimizer = reset_layers, reset_optimizer
        #: the names of the modules reset (resolved at fit start)
        self.resolved_layers: list[str] = []

    def _state_key_args(self) -> dict[str, Any]:
        return {"layers": self.layers, "reset_layers": self.reset_layers,
                "reset_optimizer": self.reset_optimizer, "every_n_tasks": self.every_n_tasks}

    def resolve(self, pl_module: nn.Module) -> list[str]:
        """The module names the layers select, checked (see the class docstring)."""
        if not self.reset_layers:
            return []
        patterns = self.layers if self.layers is not None else [default_last_layer(pl_module)]
        modules = dict(pl_module.named_modules())
        names: list[str] = []
        for pattern in patterns:
            hits = [n for n in modules if n and (n == pattern or fnmatch.fnmatchcase(n, pattern))]
            if not hits:
                available = _parameterised_layers(pl_module)
                shown = ", ".join(repr(n) for n in available[:_MAX_NAMES])
                more = f", ... ({len(available) - _MAX_NAMES} more)" \
                    if len(available) > _MAX_NAMES else ""
                raise ValueError(f"ResetLayers: layer {pattern!r} matches no module of "
                                 f"{type(pl_module).__name__}. Layers with parameters: "
                                 f"{shown}{more}.")
            names.extend(h for h in hits if h not in names)
        # A module inside another selected one is reset with it.
        names = [n for n in names if not any(n.startswith(f"{o}.") for o in names)]
        for n in names:
            module = modules[n]
            if not any(callable(getattr(m, "reset_parameters", None)) for m in module.modules()):
                raise ValueError(f"ResetLayers: {n!r} ({type(module).__name__}) has no "
                                 "reset_parameters(), so it cannot be reinitialised.")
            if any(parametrize.is_parametrized(m) for m in module.modules()):
                raise ValueError(f"ResetLayers: {n!r} is parametrized (e.g. spectral_norm), "
                                 "which is not supported.")
        return names

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.resolved_layers = self.resolve(pl_module)

    @override
    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: str,
              batch: Any) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        modules = dict(pl_module.named_modules())
        for i, name in enumerate(self.resolved_layers):
            module = modules[name]
            seed = self.seed_for(event, trainer.global_step, i)
            # load_state_dict copies in place: the optimizer keeps the same Parameter objects.
            module.load_state_dict(fresh_initialization(module, seed).state_dict())
            if optimizer is not None:
                reset_parameter_state(optimizer, module.parameters())
            self.last_seed = seed
        if self.reset_optimizer and optimizer is not None:
            reset_parameter_state(optimizer)


__all__ = ["ResetLayers", "default_last_layer"]
