"""Fresh, seeded re-initialisation of a copy of a module."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lightning_plasticity.core.isolation import forked_rng

__all__ = ["fresh_initialization"]


def fresh_initialization(module: nn.Module, seed: int) -> nn.Module:
    """A deep copy of ``module`` with every submodule's ``reset_parameters()`` called.

    The draws come from the global generators re-seeded with ``seed`` inside a fork of the RNG
    state, so the same ``seed`` gives the same values and the caller's RNG streams are left
    exactly as they were. The copy has the original's initialisation scheme (PyTorch's
    Kaiming-uniform default for ``Linear``/``Conv``, ones/zeros for norms; BatchNorm's running
    statistics reset too). Parameters of modules without ``reset_parameters`` keep their values.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> layer = nn.Linear(3, 2)
        >>> a, b = fresh_initialization(layer, 0), fresh_initialization(layer, 0)
        >>> torch.equal(a.weight, b.weight), torch.equal(a.weight, layer.weight)
        (True, False)
    """
    device = next((p.device for p in module.parameters() if p.is_cuda), None)
    with forked_rng(seed, device), torch.no_grad():
        fresh = copy.deepcopy(module)
        for m in fresh.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    return fresh
