"""Copies of a module for measurements: clean (no hooks) and fresh (seeded re-initialisation)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lightning_plasticity.core.isolation import forked_rng

__all__ = ["clean_copy", "fresh_initialization"]


def clean_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are plain copies of the values.

    ``copy.deepcopy`` also copies the Python attributes of every parameter, including hooks a
    wrapper put on them, and through those the wrapper: under DDP the parameters carry hooks
    bound to the ``DistributedDataParallel`` object, which cannot be copied. Likewise a factory
    a module keeps (``functools.partial`` from LightningCLI holds the whole CLI, and through it
    the trainer). Here parameters (values, ``requires_grad``) and buffers are copied as fresh
    tensors, callables that are not modules (factories, loss functions) are shared, and the rest
    of the module tree, including its own forward hooks (old-style weight or spectral norm), is
    deep-copied.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 2)
        >>> handle = net.weight.register_post_accumulate_grad_hook(lambda p: None)
        >>> copy_ = clean_copy(net)
        >>> torch.equal(copy_.weight, net.weight), copy_.weight._post_accumulate_grad_hooks
        (True, None)
    """
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = b.detach().clone()

    def share_callables(value: object, depth: int) -> None:
        if isinstance(value, (nn.Module, torch.Tensor, type)) or depth > 4:
            return
        if callable(value) and not isinstance(value, dict):
            # A module's own bound method (a patched forward) must follow the copy.
            if not isinstance(getattr(value, "__self__", None), nn.Module):
                memo[id(value)] = value
        elif isinstance(value, dict):
            for v in value.values():
                share_callables(v, depth + 1)
        elif isinstance(value, (list, tuple, set)):
            for v in value:
                share_callables(v, depth + 1)

    for m in module.modules():
        for name, value in vars(m).items():
            if not name.endswith("_hooks"):  # a module's own hooks are copied with it
                share_callables(value, 0)
    return copy.deepcopy(module, memo)


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
        fresh = clean_copy(module)
        for m in fresh.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    return fresh
