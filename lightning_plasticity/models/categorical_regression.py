"""Scale-invariant categorical regression: HL-Gauss and two-hot targets over a fixed support.

Regressing with the mean squared error on targets with a large offset or scale is one of the
causes of plasticity loss that Lyle et al. isolate ("Disentangling the causes of plasticity loss
in neural networks", arXiv:2402.18762, 2024): the gradients and pre-activations scale with the
targets. Their remedy is to recast regression as classification over ``num_bins`` bins spanning
``[value_min, value_max]``: each scalar target becomes a distribution over the bins, the network
outputs one logit per bin, the loss is the cross-entropy, and the prediction is the expected bin
center. The loss depends on the targets only through their position relative to the bins, so
shifting the targets and the value range together leaves it unchanged.

Two target distributions are provided:

* ``two_hot``: the target's mass is split between its two neighbouring bin centers, linearly in
  the distance (Schrittwieser et al., "Mastering Atari, Go, chess and shogi by planning with a
  learned model", Nature 2020, MuZero, Appendix F).
* ``hl_gauss``: the histogram loss with a Gaussian, the mass of ``N(target, sigma^2)`` on each bin
  (Imani & White, "Improving regression performance with distributional losses", ICML 2018;
  Farebrother et al., "Stop regressing: training value functions via classification for scalable
  deep RL", ICML 2024, who recommend ``sigma = 0.75`` bin widths).

**Bin layout.** The papers place the support differently: MuZero's two-hot support points are
``num_bins`` values from ``value_min`` to ``value_max`` inclusive, whereas Farebrother et al.'s
HL-Gauss bins partition ``[value_min, value_max]`` into ``num_bins`` intervals (``num_bins + 1``
edges, centers half a bin inside the range). Every function takes ``endpoints``:

* ``"centers"`` (default, MuZero): ``value_min`` and ``value_max`` are the outermost bin
  *centers*; bin width ``w = (value_max - value_min) / (num_bins - 1)``; the bins' edges run
  from ``value_min - w/2`` to ``value_max + w/2``. Every value in ``[value_min, value_max]`` is
  representable as an expected value, for both target kinds.
* ``"edges"`` (Farebrother et al.): ``value_min`` and ``value_max`` are the outermost bin
  *edges*; ``w = (value_max - value_min) / num_bins``; centers from ``value_min + w/2`` to
  ``value_max - w/2``.

Shapes: ``targets`` has any shape ``S``; target distributions and logits have shape
``(*S, num_bins)`` (the bins on the last dimension, one distribution per scalar target).

Example::

    >>> import torch
    >>> from lightning_plasticity.models.categorical_regression import (
    ...     bin_centers, categorical_regression_loss, expected_value, two_hot)
    >>> bin_centers(0.0, 4.0, 5)
    tensor([0., 1., 2., 3., 4.])
    >>> two_hot(torch.tensor([1.25, 9.0]), 0.0, 4.0, 5)  # 9.0 is clipped to 4.0
    tensor([[0.0000, 0.7500, 0.2500, 0.0000, 0.0000],
            [0.0000, 0.0000, 0.0000, 0.0000, 1.0000]])
    >>> logits = torch.zeros(3, 1, 5, requires_grad=True)  # 3 examples, 1 target, 5 bins
    >>> loss = categorical_regression_loss(logits, torch.tensor([[0.5], [2.0], [3.9]]),
    ...                                    0.0, 4.0, 5, kind="hl_gauss")
    >>> loss.backward()
    >>> round(loss.item(), 4)  # uniform logits: cross-entropy log(5)
    1.6094
    >>> expected_value(logits.detach(), 0.0, 4.0, 5)
    tensor([[2.],
            [2.],
            [2.]])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

CategoricalLoss = Literal["hl_gauss", "two_hot"]
Endpoints = Literal["centers", "edges"]

#: ``sigma`` of HL-Gauss in bin widths when not given (Farebrother et al. 2024, Section 3.1).
DEFAULT_SIGMA_BINS = 0.75


def _check_support(value_min: float, value_max: float, num_bins: int,
                   endpoints: str) -> tuple[float, float]:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}. Use more bins.")
    lo, hi = float(value_min), float(value_max)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ValueError(
            f"Need finite value_min < value_max, got value_min={value_min!r}, "
            f"value_max={value_max!r}. Choose a range that covers the targets.")
    if endpoints not in ("centers", "edges"):
        raise ValueError(
            f"Unknown endpoints {endpoints!r}. Choose 'centers' (value_min/value_max are the "
            "outermost bin centers) or 'edges' (they are the outermost bin edges).")
    return lo, hi


def bin_width(value_min: float, value_max: float, num_bins: int,
              endpoints: Endpoints = "centers") -> float:
    """Width of each of the ``num_bins`` equal bins (see the module docstring for ``endpoints``).

    Example::

        >>> bin_width(0.0, 4.0, 5), bin_width(0.0, 4.0, 5, endpoints="edges")
        (1.0, 0.8)
    """
    lo, hi = _check_support(value_min, value_max, num_bins, endpoints)
    return (hi - lo) / (num_bins - 1 if endpoints == "centers" else num_bins)


def bin_centers(value_min: float, value_max: float, num_bins: int,
                endpoints: Endpoints = "centers", *, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> Tensor:
    """The uniform support: ``num_bins`` bin centers, shape ``(num_bins,)``.

    With ``endpoints="centers"`` they run from ``value_min`` to ``value_max`` inclusive; with
    ``"edges"`` from ``value_min + w/2`` to ``value_max - w/2``.

    Example::

        >>> bin_centers(-1.0, 1.0, 5)
        tensor([-1.0000, -0.5000,  0.0000,  0.5000,  1.0000])
        >>> bin_centers(0.0, 1.0, 4, endpoints="edges")
        tensor([0.1250, 0.3750, 0.6250, 0.8750])
    """
    lo, hi = _check_support(value_min, value_max, num_bins, endpoints)
    w = bin_width(lo, hi, num_bins, endpoints)
    if endpoints == "edges":
        lo, hi = lo + w / 2, hi - w / 2
    return torch.linspace(lo, hi, num_bins, dtype=dtype, device=device)


def bin_edges(value_min: float, value_max: float, num_bins: int,
              endpoints: Endpoints = "centers", *, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> Tensor:
    """The ``num_bins + 1`` bin edges, shape ``(num_bins + 1,)``; bin ``i`` is
    ``[edges[i], edges[i + 1]]`` with its center in the middle.

    Example::

        >>> bin_edges(0.0, 2.0, 3)
        tensor([-0.5000,  0.5000,  1.5000,  2.5000])
        >>> bin_edges(0.0, 2.0, 4, endpoints="edges")
        tensor([0.0000, 0.5000, 1.0000, 1.5000, 2.0000])
    """
    lo, hi = _check_support(value_min, value_max, num_bins, endpoints)
    w = bin_width(lo, hi, num_bins, endpoints)
    if endpoints == "centers":
        lo, hi = lo - w / 2, hi + w / 2
    return torch.linspace(lo, hi, num_bins + 1, dtype=dtype, device=device)


def _float_targets(targets: Tensor) -> Tensor:
    return targets if targets.is_floating_point() else targets.to(torch.get_default_dtype())


def two_hot(targets: Tensor, value_min: float, value_max: float, num_bins: int,
            endpoints: Endpoints = "centers") -> Tensor:
    """Two-hot target distributions (Schrittwieser et al. 2020, MuZero, Appendix F).

    A target ``y`` between the neighbouring centers ``c_i <= y <= c_{i+1}`` gets probability
    ``(c_{i+1} - y) / w`` on bin ``i`` and ``(y - c_i) / w`` on bin ``i + 1``, so the expected
    center is ``y`` exactly; a target on a center is one-hot. Targets outside the outermost
    centers are clipped to them.

    Args:
        targets: scalar targets of any shape ``S`` (integers are converted to floats).
        value_min: lower end of the support.
        value_max: upper end of the support.
        num_bins: number of bins (at least 2).
        endpoints: ``"centers"`` or ``"edges"``, see the module docstring.

    Returns:
        Probabilities of shape ``(*S, num_bins)`` in the targets' floating dtype.

    Example::

        >>> two_hot(torch.tensor([0.0, 0.3, 1.0]), 0.0, 1.0, 3)
        tensor([[1.0000, 0.0000, 0.0000],
                [0.4000, 0.6000, 0.0000],
                [0.0000, 0.0000, 1.0000]])
    """
    lo, hi = _check_support(value_min, value_max, num_bins, endpoints)
    w = bin_width(lo, hi, num_bins, endpoints)
    first = lo + w / 2 if endpoints == "edges" else lo
    last = hi - w / 2 if endpoints == "edges" else hi
    y = _float_targets(targets)
    pos = (y.clamp(first, last) - first) / w
    # long() before clamp: a NaN target gives index 0 and NaN weights instead of a bad index.
    lower = pos.detach().floor().long().clamp(0, num_bins - 2)
    upper_weight = (pos - lower.to(pos.dtype)).unsqueeze(-1)
    zeros = torch.zeros(*y.shape, num_bins, dtype=y.dtype, device=y.device)
    index = lower.unsqueeze(-1)
    return zeros.scatter(-1, index, 1.0 - upper_weight).scatter_add(-1, index + 1, upper_weight)


def hl_gauss(targets: Tensor, value_min: float, value_max: float, num_bins: int,
             sigma: float | None = None, endpoints: Endpoints = "centers") -> Tensor:
    """HL-Gauss target distributions (Imani & White 2018; Farebrother et al. 2024).

    Bin ``i`` gets the mass of ``N(y, sigma^2)`` on ``[edges[i], edges[i+1]]``,
    ``(erf((e_{i+1} - y) / (sqrt(2) sigma)) - erf((e_i - y) / (sqrt(2) sigma))) / 2``,
    renormalised by the mass on the whole support ``[edges[0], edges[num_bins]]`` so the bins
    sum to one. Targets outside ``[value_min, value_max]`` are clipped to it first (Farebrother
    et al. do not clip; clipping keeps at least half of the Gaussian inside the support, so the
    renormalisation never divides by zero).

    Args:
        targets: scalar targets of any shape ``S`` (integers are converted to floats).
        value_min: lower end of the support.
        value_max: upper end of the support.
        num_bins: number of bins (at least 2).
        sigma: the Gaussian's standard deviation, in target units; default 0.75 bin widths, the
            ratio Farebrother et al. recommend.
        endpoints: ``"centers"`` or ``"edges"``, see the module docstring.

    Returns:
        Probabilities of shape ``(*S, num_bins)`` in the targets' floating dtype.

    Example::

        >>> p = hl_gauss(torch.tensor([0.5]), 0.0, 1.0, 3, sigma=0.25)  # edges -0.25 ... 1.25
        >>> p  # N(0.5, 0.25^2) on +-1, +-3 sigma: 0.6827 and 0.9973, renormalised
        tensor([[0.1577, 0.6845, 0.1577]])
        >>> round(p.sum().item(), 6)
        1.0
    """
    lo, hi = _check_support(value_min, value_max, num_bins, endpoints)
    if sigma is None:
        sigma = DEFAULT_SIGMA_BINS * bin_width(lo, hi, num_bins, endpoints)
    elif not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}; leave it None for "
                         f"{DEFAULT_SIGMA_BINS} bin widths.")
    y = _float_targets(targets)
    edges = bin_edges(lo, hi, num_bins, endpoints, dtype=y.dtype, device=y.device)
    cdf = torch.special.erf((edges - y.clamp(lo, hi).unsqueeze(-1)) / (math.sqrt(2.0) * sigma))
    return (cdf[..., 1:] - cdf[..., :-1]) / (cdf[..., -1:] - cdf[..., :1])


def target_distribution(targets: Tensor, value_min: float, value_max: float, num_bins: int,
                        kind: CategoricalLoss = "hl_gauss", sigma: float | None = None,
                        endpoints: Endpoints = "centers") -> Tensor:
    """:func:`hl_gauss` or :func:`two_hot` of ``targets``, by ``kind``.

    Example::

        >>> target_distribution(torch.tensor(0.5), 0.0, 1.0, 3, kind="two_hot")
        tensor([0., 1., 0.])
    """
    if kind == "hl_gauss":
        return hl_gauss(targets, value_min, value_max, num_bins, sigma, endpoints)
    if kind == "two_hot":
        if sigma is not None:
            raise ValueError(f"sigma={sigma!r} only applies to kind='hl_gauss'; leave it None "
                             "for kind='two_hot'.")
        return two_hot(targets, value_min, value_max, num_bins, endpoints)
    raise ValueError(f"Unknown kind {kind!r}. Choose 'hl_gauss' or 'two_hot'.")


def categorical_regression_loss(
    logits: Tensor,
    targets: Tensor,
    value_min: float,
    value_max: float,
    num_bins: int,
    kind: CategoricalLoss = "hl_gauss",
    sigma: float | None = None,
    endpoints: Endpoints = "centers",
) -> Tensor:
    """Cross-entropy between the targets' bin distributions and ``softmax(logits)``.

    ``-(p * log_softmax(logits)).sum(-1).mean()`` with ``p`` the :func:`hl_gauss` or
    :func:`two_hot` distribution of each scalar target (Lyle et al. 2024's fix for plasticity
    loss from large regression targets; Farebrother et al. 2024), averaged over all targets.
    Computed in at least float32.

    Args:
        logits: shape ``(*S, num_bins)``, one row of bin logits per scalar target. A network
            with ``T * num_bins`` outputs for ``T`` targets reshapes them to
            ``(batch, T, num_bins)`` (``T`` blocks of ``num_bins`` consecutive outputs).
        targets: scalar targets of shape ``S``.
        value_min: lower end of the support.
        value_max: upper end of the support.
        num_bins: number of bins (at least 2).
        kind: ``"hl_gauss"`` or ``"two_hot"``.
        sigma: HL-Gauss standard deviation in target units (default 0.75 bin widths); must be
            None for two-hot.
        endpoints: ``"centers"`` or ``"edges"``, see the module docstring.

    Returns:
        The scalar mean loss.

    Example::

        >>> logits = torch.tensor([[0.0, 5.0, 0.0]])
        >>> loss = categorical_regression_loss(logits, torch.tensor([0.0]), -1.0, 1.0, 3,
        ...                                    kind="two_hot")
        >>> torch.allclose(loss, -torch.log_softmax(logits, -1)[0, 1])
        True
    """
    if kind not in ("hl_gauss", "two_hot"):
        raise ValueError(f"Unknown kind {kind!r}. Choose 'hl_gauss' or 'two_hot'.")
    if tuple(logits.shape) != (*targets.shape, num_bins):
        raise ValueError(
            f"logits must have shape targets.shape + (num_bins,) = "
            f"{(*targets.shape, num_bins)}, got {tuple(logits.shape)}. Reshape a network's "
            "(batch, T * num_bins) outputs to (batch, T, num_bins) and targets to (batch, T).")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    probs = target_distribution(targets.to(dtype), value_min, value_max, num_bins, kind, sigma,
                                endpoints)
    return -(probs * torch.log_softmax(logits.to(dtype), dim=-1)).sum(-1).mean()


def expected_value(logits: Tensor, value_min: float, value_max: float, num_bins: int,
                   endpoints: Endpoints = "centers") -> Tensor:
    """Decode predictions: ``sum_i softmax(logits)_i * c_i`` over the bin centers ``c``.

    Args:
        logits: shape ``(*S, num_bins)``.
        value_min: lower end of the support.
        value_max: upper end of the support.
        num_bins: number of bins (at least 2).
        endpoints: ``"centers"`` or ``"edges"``, see the module docstring.

    Returns:
        Predictions of shape ``S``, in ``[c_0, c_{num_bins-1}]``.

    Example::

        >>> expected_value(torch.log(torch.tensor([0.5, 0.5, 0.0])), 0.0, 1.0, 3)
        tensor(0.2500)
    """
    if logits.shape[-1] != num_bins:
        raise ValueError(f"logits must have num_bins={num_bins} entries on the last dimension, "
                         f"got shape {tuple(logits.shape)}.")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    centers = bin_centers(value_min, value_max, num_bins, endpoints, dtype=dtype,
                          device=logits.device)
    return (torch.softmax(logits.to(dtype), dim=-1) * centers).sum(-1)


class BinnedNetworkFactory:
    """Wraps a network factory so the network outputs ``num_bins`` logits per target.

    ``BinnedNetworkFactory(factory, num_bins)(input_shape, num_targets)`` is
    ``factory(input_shape, num_targets * num_bins)``; output ``j * num_bins + k`` is the logit
    of bin ``k`` of target ``j``. Picklable when ``factory`` is.

    Args:
        factory: builds a network from ``(input_shape, num_outputs)``.
        num_bins: logits per target (at least 2).

    Example::

        >>> from lightning_plasticity.models import MLP
        >>> net = BinnedNetworkFactory(MLP, num_bins=11)((4,), 2)
        >>> net(torch.zeros(3, 4)).shape
        torch.Size([3, 22])
    """

    def __init__(self, factory: Callable[[tuple[int, ...], int], nn.Module],
                 num_bins: int) -> None:
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}. Use more bins.")
        self.factory, self.num_bins = factory, num_bins

    def __call__(self, input_shape: Sequence[int], num_outputs: int, **kwargs: Any) -> nn.Module:
        return self.factory(tuple(input_shape), int(num_outputs) * self.num_bins, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.factory!r}, num_bins={self.num_bins})"
