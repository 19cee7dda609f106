"""Reset optimizers' per-parameter state, whole or for some rows/columns of a parameter.

An intervention that reinitialises weights must also forget what the optimizer learned about the
old ones: Adam's moments of a dead unit's weights are near zero, so a reinitialised unit would
take huge first steps (or, with stale large ``exp_avg_sq``, none at all), and dormant units come
straight back. These helpers work for any ``torch.optim.Optimizer`` whose state is a dict of
tensors per parameter (SGD's ``momentum_buffer``; Adam/AdamW's ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``; RMSprop's ``square_avg``, ``momentum_buffer``, ``grad_avg``; ...).

A module may have several optimizers (a GAN's generator and discriminator, or one optimizer per
parameter group): :func:`reset_touched` and :func:`drop_state` act on every optimizer of a list
that holds state for the parameter (``trainer.optimizers`` in a callback), and on nothing else.
No Lightning import here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from lightning_plasticity.interventions.surgery import ParamEntries

__all__ = ["drop_state", "reset_parameter_state", "reset_state_entries", "reset_touched"]


def reset_parameter_state(optimizer: torch.optim.Optimizer,
                          params: Iterable[Tensor] | None = None) -> int:
    """Forget the optimizer state of whole parameters (all of them when ``params`` is None).

    The state is deleted, so the optimizer re-creates it at its next step exactly as for a new
    parameter (for Adam: zero moments and ``step = 0``, hence the full bias correction).

    Args:
        optimizer: The optimizer.
        params: The parameters whose state to drop.

    Returns:
        How many parameters had state.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.Adam([w])
        >>> w.grad = torch.ones(2)
        >>> opt.step()
        >>> reset_parameter_state(opt, [w]), w in opt.state
        (1, False)
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

    Example:
        Rows 0 and 2 of a weight (the incoming weights of units 0 and 2):

        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(3, 2))
        >>> opt = torch.optim.Adam([w])
        >>> w.grad = torch.ones(3, 2)
        >>> opt.step()
        >>> reset_state_entries(opt, w, torch.tensor([0, 2]), dim=0)
        ['exp_avg', 'exp_avg_sq']
        >>> opt.state[w]["exp_avg"][:, 0]
        tensor([0.0000, 0.1000, 0.0000])
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


def reset_touched(optimizers: Iterable[torch.optim.Optimizer],
                  touched: Iterable[ParamEntries]) -> int:
    """Zero, in every optimizer holding state for them, the state of exactly the entries written.

    Args:
        optimizers: All optimizers of the model (``trainer.optimizers``).
        touched: The entries an intervention wrote (returned by
            :func:`~lightning_plasticity.interventions.surgery.reinitialize_units`).

    Returns:
        How many (optimizer, parameter) pairs had state reset.
    """
    optimizers, count = list(optimizers), 0
    for entries in touched:
        for optimizer in optimizers:
            if reset_state_entries(optimizer, entries.param, entries.index, entries.dim):
                count += 1
    return count


def drop_state(optimizers: Iterable[torch.optim.Optimizer],
               params: Iterable[Tensor] | None = None) -> int:
    """:func:`reset_parameter_state` in every optimizer (all state when ``params`` is None).

    Returns:
        How many (optimizer, parameter) pairs had state.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
        >>> opts = [torch.optim.Adam([a]), torch.optim.SGD([b], lr=0.1, momentum=0.9)]
        >>> a.grad, b.grad = torch.ones(2), torch.ones(2)
        >>> for opt in opts:
        ...     opt.step()
        >>> drop_state(opts, [b]), a in opts[0].state, b in opts[1].state
        (1, True, False)
    """
    params = None if params is None else list(params)
    return sum(reset_parameter_state(o, params) for o in optimizers)
