"""Scalar summaries of a spectrum: effective rank, eps-rank and condition number.

Every function takes a 1-D tensor of nonnegative values (eigenvalues of a PSD matrix or singular
values), returns a 0-d tensor on the same device and never reads the gradient graph. Eigenvalues
of PSD matrices computed in floating point can come out slightly negative; clamp them at zero
before calling (``values.clamp_min(0)``): a negative value is rejected rather than silently
reinterpreted.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["condition_number", "effective_rank", "eps_count"]


def _check_values(values: Tensor, fn: str) -> Tensor:
    if not isinstance(values, Tensor) or values.dim() != 1:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"{fn}() expects a 1-D tensor of values, got {shape}.")
    values = values.detach()
    if not values.is_floating_point():
        values = values.to(torch.get_default_dtype())
    if bool((values < 0).any()):
        raise ValueError(
            f"{fn}() expects nonnegative values, got a minimum of {values.min().item():.3e}; "
            "clamp eigenvalues of PSD matrices at zero first (values.clamp_min(0))."
        )
    return values


def effective_rank(values: Tensor) -> Tensor:
    """Effective rank ``exp(H(p))`` of a spectrum (Roy & Vetterli, 2007).

    With ``p = s / sum(s)`` the normalised spectrum and ``H(p) = -sum_i p_i log p_i`` its Shannon
    entropy (``0 log 0 = 0``), the effective rank is ``exp(H(p))``: ``k`` for ``k`` equal nonzero
    values, ``1`` for a single nonzero value, and in general a real number between 1 and the
    number of nonzero values (O. Roy and M. Vetterli, "The effective rank: A measure of effective
    dimensionality", EUSIPCO 2007). It is scale invariant. An all-zero (or empty) spectrum has
    effective rank 0, the rank of the zero matrix.

    Args:
        values: 1-D tensor of nonnegative values, e.g. singular values or PSD eigenvalues.

    Returns:
        0-d floating tensor.

    Raises:
        ValueError: If ``values`` is not 1-D or has a negative entry.

    Example::

        >>> import torch
        >>> from lightning_plasticity.measures.spectral_stats import effective_rank
        >>> round(float(effective_rank(torch.ones(5))), 4)
        5.0
        >>> effective_rank(torch.tensor([3.0, 0.0, 0.0]))
        tensor(1.)
    """
    values = _check_values(values, "effective_rank")
    total = values.sum()
    if values.numel() == 0 or total <= 0:
        return torch.zeros((), dtype=values.dtype, device=values.device)
    p = values / total
    # xlogy gives 0 * log 0 = 0, so exact zeros do not count.
    entropy = -torch.special.xlogy(p, p).sum()
    return entropy.exp()


def eps_count(values: Tensor, eps: float, *, relative: bool = False) -> Tensor:
    """Number of values strictly above a threshold (the eps-rank of a spectrum).

    The threshold is ``eps`` (``relative=False``) or ``eps * max(values)`` (``relative=True``).
    With singular values and ``relative=True`` this is the usual numerical rank, e.g. NumPy's
    ``matrix_rank`` with ``eps = max(m, n) * finfo.eps``.

    Args:
        values: 1-D tensor of nonnegative values.
        eps: Nonnegative threshold, absolute or relative to the largest value.
        relative: Scale ``eps`` by the largest value.

    Returns:
        0-d ``int64`` tensor.

    Raises:
        ValueError: If ``eps`` is negative, or ``values`` is not 1-D or has a negative entry.

    Example::

        >>> import torch
        >>> from lightning_plasticity.measures.spectral_stats import eps_count
        >>> eps_count(torch.tensor([1.0, 1e-3, 1e-9]), 1e-6)
        tensor(2)
        >>> eps_count(torch.tensor([10.0, 1e-3, 0.0]), 1e-3, relative=True)
        tensor(1)
    """
    if eps < 0:
        raise ValueError(f"eps must be nonnegative, got {eps}.")
    values = _check_values(values, "eps_count")
    if values.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=values.device)
    threshold = eps * values.max() if relative else eps
    return (values > threshold).sum()


def condition_number(values: Tensor, eps: float = 0.0) -> Tensor:
    """Ratio of the largest to the smallest value, ``inf`` for a (numerically) singular spectrum.

    ``kappa = max(values) / min(values)``, the 2-norm condition number of a PSD matrix from its
    eigenvalues. A smallest value at or below ``eps * max(values)`` counts as zero and gives
    ``inf``, so with the same ``eps`` the condition number is finite exactly when
    ``eps_count(values, eps, relative=True) == len(values)``. An all-zero or empty spectrum gives
    ``nan`` (undefined).

    Args:
        values: 1-D tensor of nonnegative values.
        eps: Nonnegative tolerance relative to the largest value.

    Returns:
        0-d floating tensor.

    Raises:
        ValueError: If ``eps`` is negative, or ``values`` is not 1-D or has a negative entry.

    Example::

        >>> import torch
        >>> from lightning_plasticity.measures.spectral_stats import condition_number
        >>> condition_number(torch.tensor([4.0, 2.0, 1.0]))
        tensor(4.)
        >>> condition_number(torch.tensor([4.0, 0.0]))
        tensor(inf)
    """
    if eps < 0:
        raise ValueError(f"eps must be nonnegative, got {eps}.")
    values = _check_values(values, "condition_number")
    if values.numel() == 0 or values.max() <= 0:
        return torch.full((), float("nan"), dtype=values.dtype, device=values.device)
    largest, smallest = values.max(), values.min()
    if smallest <= eps * largest:
        return torch.full((), float("inf"), dtype=values.dtype, device=values.device)
    return largest / smallest
