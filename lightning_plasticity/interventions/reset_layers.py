"""``ResetLayers``: reinitialise named layers and/or reset the optimizer state at task starts."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn.utils import parametrize
from typing_extensions import override

from lightning_plasticity.core.initialization import fresh_initialization
from lightning_plasticity.core.layers import ROOT_NAME, describe_names, parameterised_layers
from lightning_plasticity.interventions.optimizer_state import drop_state
from lightning_plasticity.interventions.schedule import ScheduledIntervention

__all__ = ["ResetLayers", "copy_trainable", "default_last_layer"]


def _parameterised_layers(pl_module: nn.Module) -> list[str]:
    return [n for n in parameterised_layers(pl_module) if n != ROOT_NAME]


@torch.no_grad()
def copy_trainable(module: nn.Module, fresh: nn.Module) -> tuple[list[nn.Parameter], list[str]]:
    """Copy ``fresh``'s values into ``module``'s trainable parameters, in place.

    ``fresh`` has ``module``'s structure (a :func:`~lightning_plasticity.core.initialization.
    fresh_initialization` of it). Frozen parameters (``requires_grad=False``) keep their values,
    and so do the buffers (BatchNorm's running statistics) of a submodule with a frozen
    parameter; every other buffer is copied. Copying in place keeps the ``Parameter`` objects the
    optimizers hold.

    Returns:
        The parameters written, and the names of the frozen parameters left alone.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> layer = nn.Linear(2, 2)
        >>> _ = layer.bias.requires_grad_(False)
        >>> written, frozen = copy_trainable(layer, nn.Linear(2, 2))
        >>> [tuple(p.shape) for p in written], frozen
        ([(2, 2)], ['bias'])
    """
    written: list[nn.Parameter] = []
    frozen: list[str] = []
    for (prefix, m), twin in zip(module.named_modules(), fresh.modules()):
        p_fresh = dict(twin.named_parameters(recurse=False))
        all_trainable = True
        for name, p in m.named_parameters(recurse=False):
            if p.requires_grad:
                p.copy_(p_fresh[name])
                written.append(p)
            else:
                all_trainable = False
                frozen.append(f"{prefix}.{name}" if prefix else name)
        if all_trainable:
            b_fresh = dict(twin.named_buffers(recurse=False))
            for name, b in m.named_buffers(recurse=False):
                if b_fresh.get(name) is not None:
                    b.copy_(b_fresh[name])
    return written, frozen


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
      of the reset parameters is dropped too, in every optimizer of ``trainer.optimizers`` that
      holds them: moments estimated for the old weights mean nothing for the new ones. Only
      trainable parameters are reset: frozen ones (``requires_grad=False``) and the buffers of
      a submodule with a frozen parameter keep their values (said once in a warning). Nothing
      else changes.
    * ``reset_optimizer``: the state of *every* parameter is dropped, in every optimizer; the
      optimizers start over (for Adam: zero moments and a fresh bias correction) at the next
      step.

    Layer names are checked at fit start: a name (or fnmatch pattern) matching no module is a
    ``ValueError`` listing the layers there are. Task ``0`` is never reset.

    Args:
        layers: module names or fnmatch patterns, relative to the LightningModule
            (``"network.head"``, ``"network.layers.*"``); ``None``: the last layer, i.e. the
            network's ``head`` or else the last module that owns parameters.
        reset_layers: reinitialise the layers.
        reset_optimizer: drop the whole state of every optimizer (``trainer.optimizers``).
        every_n_tasks: act at the start of every this many tasks.
        seed: base seed of the reinitialisations (default: rank 0's torch seed at fit start).

    Example:
        Lyle et al.'s two interventions at every task switch are
        ``ResetLayers(reset_optimizer=True)``; ``ResetLayers(reset_layers=False,
        reset_optimizer=True)`` resets the optimizers only. The layers are resolved at fit
        start:

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> ResetLayers().resolve(net), ResetLayers(layers=["0", "2"]).resolve(net)
        (['2'], ['0', '2'])
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
                raise ValueError(f"ResetLayers: layer {pattern!r} matches no module of "
                                 f"{type(pl_module).__name__}. Layers with parameters: "
                                 f"{describe_names(_parameterised_layers(pl_module))}.")
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
        optimizers = list(trainer.optimizers)
        modules = dict(pl_module.named_modules())
        for i, name in enumerate(self.resolved_layers):
            module = modules[name]
            seed = self.seed_for(event, trainer.global_step, i)
            written, frozen = copy_trainable(module, fresh_initialization(module, seed))
            if frozen:
                self._warn_once(f"the frozen parameters {[f'{name}.{n}' for n in frozen]} "
                                "(requires_grad=False) are not reset")
            drop_state(optimizers, written)
            self.last_seed = seed
        if self.reset_optimizer:
            drop_state(optimizers)

