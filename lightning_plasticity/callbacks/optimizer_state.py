"""Reset an optimizer's per-parameter state, whole or for some rows/columns of a parameter.

An intervention that reinitialises weights must also forget what the optimizer learned about the
old ones: Adam's moments of a dead unit's weights are near zero, so a reinitialised unit would
take huge first steps (or, with stale large ``exp_avg_sq``, none at all), and dormant units come
straight back. These helpers work for any ``torch.optim.Optimizer`` whose state is a dict of
tensors per parameter (SGD's ``momentum_buffer``; Adam/AdamW's ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``; RMSprop's ``square_avg``, ``momentum_buffer``, ``grad_avg``; ...).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["reset_parameter_state", "reset_state_entries"]


def reset_parameter_state(optimizer: torch.optim.Optimizer,
                          params: Iterable[Tensor] | None = None) -> int:
    """Forget the optimizer state of whole parameters (all of them when ``params`` is None).

    The state is deleted, so the optimizer re-creates it at its next step exactly as for a new
    parameter (for Adam: zero moments and ``step = 0``, hence the full bias correction).

    Args:
        optimizer: The optimizer (``trainer.optimizers[0]`` in a callback).
        params: The parameters whose state to drop.

    Returns:
        How many parameters had state.

    Example::

        reset_parameter_state(trainer.optimizers[0], pl_module.network.head.parameters())
    """
    if params is None:
        count = sum(1 for s in optimizer.state.values() if s)
        optimizer.state.clear()
        return count
    count = 0
    for p in params:
        if optimizer.state.pop(p, None):
            count += 1
    return count


@torch.no_grad()
def reset_state_entries(optimizer: torch.optim.Optimizer, param: Tensor, index: Tensor,
                        dim: int = 0) -> list[str]:
    """Zero the optimizer state of some entries of a parameter along one dimension.

    Every state tensor shaped like ``param`` (Adam's ``exp_avg`` and ``exp_avg_sq``, momentum
    buffers, ...) has its slices ``index`` along ``dim`` set to zero; every other entry stays
    bit-identical. Scalar state such as Adam's ``step`` is shared by the whole tensor and is left
    alone, so Adam bias-corrects a reset entry with the parameter's step count: its first
    updates are about ``lr * (1 - beta1) / sqrt(1 - beta2)`` (3.2 ``lr`` with the default betas)
    instead of ``lr``, decaying as the moments refill. Dohare et al.'s reference implementation
    of continual backprop keeps a per-entry step instead; PyTorch's Adam has none.

    Args:
        optimizer: The optimizer.
        param: The parameter.
        index: Indices along ``dim`` (rows: ``dim=0``; columns: ``dim=1``).
        dim: The dimension.

    Returns:
        The names of the state entries reset (empty when the parameter has no state yet).

    Example::

        # Rows 3 and 7 of a Linear's weight (the incoming weights of units 3 and 7):
        reset_state_entries(opt, layer.weight, torch.tensor([3, 7]), dim=0)
    """
    state = optimizer.state.get(param)
    if not state:
        return []
    reset = []
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == param.shape and value.dim() > 0:
            value.index_fill_(dim, index.to(value.device, torch.long), 0)
            reset.append(key)
    return reset
