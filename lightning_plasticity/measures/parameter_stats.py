"""Parameter statistics: norms, distance from initialisation, Wasserstein drift, stable rank.

For every parameter tensor ``theta`` (with initial values ``theta_0`` and an earlier snapshot
``theta_prev``, e.g. taken at the start of the current task), all in float64:

* weight norm ``||theta||_2`` and mean absolute value ``mean |theta|``. Growing parameter norms
  accompany plasticity loss (Dohare et al., 2024, "Loss of plasticity in deep continual
  learning"; Lyle et al., 2024, "Disentangling the causes of plasticity loss in neural
  networks").
* distance from initialisation ``||theta - theta_0||_2`` (what L2-Init regularises; Kumar et al.,
  2023, "Maintaining plasticity in continual learning via regenerative regularization").
* Wasserstein distance between the empirical distributions of the values of ``theta`` and of
  ``theta_0`` (the same number ``m`` of values each). In one dimension the optimal coupling
  matches order statistics, so ``W_p = (mean_k |sort(theta)_k - sort(theta_0)_k|^p)^(1/p)``:
  ``p = 1`` (default) ``W1 = mean |sort(theta) - sort(theta_0)|``; ``p = 2``
  ``W2 = sqrt(mean (sort(theta) - sort(theta_0))^2)``, the distance penalised by the Wasserstein
  regulariser of Lewandowski et al. (2023), "Directions of curvature as an explanation for loss
  of plasticity". It ignores *which* weight holds which value: a permutation of ``theta_0`` has
  ``W_p = 0`` but a positive L2 distance; ``theta_0 + c`` has ``W_p = |c|``.
* stable rank ``||W||_F^2 / ||W||_2^2`` of every parameter with at least two dimensions, reshaped
  to ``(shape[0], -1)`` (a conv kernel ``(out, in, kh, kw)`` becomes ``(out, in * kh * kw)``);
  0 for a zero matrix.
* update size ``||theta - theta_prev||_2``.
* gradient norm ``||theta.grad||_2`` if ``.grad`` is set (otherwise ``nan``).

Aggregates over a layer (the parameters of one module; a parametrization's ``original`` counts
for the parametrized module) and over all parameters: norms and distances are the L2 norms of
the concatenation (``sqrt`` of summed squares), ``mean |theta|`` is the mean over all values,
the Wasserstein distance is the per-tensor coupling pooled over values,
``(sum_t sum_k |sort diff|^p / sum_t m_t)^(1/p)`` (each tensor matched to its own initial
values; an upper bound on the Wasserstein distance of the pooled distributions), the stable rank
is the mean over the matrices, and the gradient norm covers the tensors that have a gradient.

DDP
---
There is no batch: under DDP the parameters (and, after the backward, the averaged gradients)
are identical on every rank, so every rank computes the same numbers and no reduce is needed.
The split into per-tensor sums (:func:`parameter_stat_sums`) and metrics
(:func:`parameter_stats_from_sums`) lets a caller aggregate its own groups of tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "ParameterGroupStats",
    "ParameterStatSums",
    "ParameterStats",
    "parameter_stat_sums",
    "parameter_stats",
    "parameter_stats_from_sums",
    "snapshot_parameters",
]

#: A parameter selection as returned by ``select_parameters`` (``(name, parameter)`` pairs).
NamedParams = Sequence[tuple[str, Tensor]]
_NAN = math.nan


def snapshot_parameters(
    model: nn.Module, *, device: torch.device | str | None = None
) -> dict[str, Tensor]:
    """Detached copies of the model's parameters, keyed by ``named_parameters()`` names.

    Args:
        model: The model.
        device: Where to keep the copies (e.g. ``"cpu"`` to save accelerator memory); default
            the parameters' device.

    Returns:
        ``name -> tensor`` to pass as ``init`` or ``previous`` to :func:`parameter_stats`.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_plasticity.measures import snapshot_parameters
        >>> model = nn.Linear(3, 2)
        >>> init = snapshot_parameters(model)  # at initialisation
        >>> sorted(init), init["weight"].requires_grad, torch.equal(init["weight"], model.weight)
        (['bias', 'weight'], False, True)
        >>> previous = snapshot_parameters(model, device="cpu")  # at the start of a task
        >>> previous["bias"].device.type
        'cpu'
    """
    return {
        name: p.detach().to(device=device, copy=True) if device is not None else p.detach().clone()
        for name, p in model.named_parameters()
    }


@dataclass(frozen=True)
class ParameterStatSums:
    """Additive statistics of one parameter tensor (or a group); ``nan`` where unavailable.

    Attributes:
        numel: Number of values.
        sq_sum: ``sum theta^2``.
        abs_sum: ``sum |theta|``.
        init_numel: Values compared with an initial snapshot (0 without ``init``).
        init_sq_dist: ``sum (theta - theta_0)^2``.
        wasserstein_sum: ``sum_k |sort(theta)_k - sort(theta_0)_k|^p``.
        prev_sq_dist: ``sum (theta - theta_prev)^2``.
        grad_sq_sum: ``sum grad^2`` over tensors with a gradient.
        num_grads: Tensors with a gradient.
        stable_rank_sum: Sum of the stable ranks of the matrices.
        num_matrices: Number of matrices (parameters with ``dim >= 2``) with a stable rank.
    """

    numel: int
    sq_sum: float
    abs_sum: float
    init_numel: int = 0
    init_sq_dist: float = _NAN
    wasserstein_sum: float = _NAN
    prev_sq_dist: float = _NAN
    grad_sq_sum: float = _NAN
    num_grads: int = 0
    stable_rank_sum: float = 0.0
    num_matrices: int = 0

    def __add__(self, other: ParameterStatSums) -> ParameterStatSums:
        def add(a: float, b: float) -> float:
            # nan means "not available": a group sum covers the tensors that have the value.
            if math.isnan(a):
                return b
            if math.isnan(b):
                return a
            return a + b

        return ParameterStatSums(
            numel=self.numel + other.numel,
            sq_sum=self.sq_sum + other.sq_sum,
            abs_sum=self.abs_sum + other.abs_sum,
            init_numel=self.init_numel + other.init_numel,
            init_sq_dist=add(self.init_sq_dist, other.init_sq_dist),
            wasserstein_sum=add(self.wasserstein_sum, other.wasserstein_sum),
            prev_sq_dist=add(self.prev_sq_dist, other.prev_sq_dist),
            grad_sq_sum=add(self.grad_sq_sum, other.grad_sq_sum),
            num_grads=self.num_grads + other.num_grads,
            stable_rank_sum=self.stable_rank_sum + other.stable_rank_sum,
            num_matrices=self.num_matrices + other.num_matrices,
        )


@dataclass(frozen=True)
class ParameterGroupStats:
    """Statistics of a parameter tensor, a layer or all parameters (``nan`` where unavailable).

    Attributes:
        numel: Number of values.
        norm: ``||theta||_2``.
        mean_abs: ``mean |theta|``.
        distance_from_init: ``||theta - theta_0||_2``.
        wasserstein: ``W_p`` to the initial values (see the module docstring).
        stable_rank: Stable rank (mean over the matrices of a group).
        update_norm: ``||theta - theta_prev||_2``.
        grad_norm: ``||grad||_2``.
    """

    numel: int
    norm: float
    mean_abs: float
    distance_from_init: float
    wasserstein: float
    stable_rank: float
    update_norm: float
    grad_norm: float


_GROUP_FIELDS = (
    "norm",
    "mean_abs",
    "distance_from_init",
    "wasserstein",
    "stable_rank",
    "update_norm",
    "grad_norm",
)


@dataclass(frozen=True)
class ParameterStats:
    """Parameter statistics per tensor, per layer and in total.

    Attributes:
        tensors: Parameter name -> :class:`ParameterGroupStats`.
        layers: Module name -> :class:`ParameterGroupStats` over its parameters.
        total: Over all selected parameters.
        wasserstein_p: The ``p`` of the Wasserstein distance.
    """

    tensors: dict[str, ParameterGroupStats]
    layers: dict[str, ParameterGroupStats]
    total: ParameterGroupStats
    wasserstein_p: int

    def scalars(self, per_layer: bool = True, per_tensor: bool = False,
                layer_first: bool = False) -> dict[str, float]:
        """Flat ``name -> float`` for logging, without ``nan`` entries.

        Keys are ``"norm"``, ``"distance_from_init"``, ... for the total and
        ``"norm/<layer>"`` / ``"norm/<parameter>"`` per layer / tensor; with ``layer_first``
        (the callback's layout, which groups a layer's panels in a dashboard)
        ``"total/norm"`` and ``"<layer>/norm"``.

        Example::

            >>> from torch import nn
            >>> from lightning_plasticity.measures import parameter_stats, snapshot_parameters
            >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
            >>> stats = parameter_stats(model, init=snapshot_parameters(model))
            >>> logged = {f"params/{k}": v for k, v in stats.scalars().items()}
            >>> logged["params/distance_from_init"], logged["params/distance_from_init/2"]
            (0.0, 0.0)
            >>> "params/norm/0" in logged, "params/grad_norm" in logged  # no .grad: no entry
            (True, False)
            >>> # in a LightningModule or Callback hook: pl_module.log_dict(logged)
        """
        def key(field: str, group: str | None) -> str:
            if layer_first:
                return f"{group or 'total'}/{field}"
            return field if group is None else f"{field}/{group}"

        out = {key(f, None): getattr(self.total, f) for f in _GROUP_FIELDS}
        groups: list[dict[str, ParameterGroupStats]] = []
        if per_layer:
            groups.append(self.layers)
        if per_tensor:
            groups.append(self.tensors)
        for group in groups:
            for name, g in group.items():
                for f in _GROUP_FIELDS:
                    out[key(f, name)] = getattr(g, f)
        return {k: v for k, v in out.items() if not math.isnan(v)}


def _snapshot_value(snapshot: Mapping[str, Tensor], name: str, p: Tensor, what: str) -> Tensor:
    if name not in snapshot:
        raise ValueError(
            f"the {what} snapshot has no entry {name!r}; take it with snapshot_parameters(model) "
            "on the same model (names as in model.named_parameters())."
        )
    ref = snapshot[name]
    if tuple(ref.shape) != tuple(p.shape):
        raise ValueError(
            f"the {what} snapshot of {name!r} has shape {tuple(ref.shape)}, the parameter "
            f"{tuple(p.shape)}; take a new snapshot after changing the architecture."
        )
    return ref.detach().to(device=p.device, dtype=torch.float64)


def _stable_rank(w: Tensor) -> float:
    m = w.reshape(w.shape[0], -1)
    spectral = float(torch.linalg.matrix_norm(m, ord=2))
    if spectral == 0:
        return 0.0
    return float(m.square().sum()) / spectral**2


def parameter_stat_sums(
    params: NamedParams,
    init: Mapping[str, Tensor] | None = None,
    previous: Mapping[str, Tensor] | None = None,
    *,
    wasserstein_p: Literal[1, 2] = 1,
    stable_rank: bool = True,
) -> dict[str, ParameterStatSums]:
    """Additive per-tensor statistics (float64); see :class:`ParameterStatSums`.

    Args:
        params: ``(name, parameter)`` pairs, e.g. ``list(model.named_parameters())``.
        init: ``name -> initial values`` (:func:`snapshot_parameters` at initialisation).
        previous: ``name -> earlier values`` for the update size.
        wasserstein_p: 1 or 2.
        stable_rank: Compute stable ranks (one SVD per matrix).

    Returns:
        Parameter name -> :class:`ParameterStatSums`.

    Raises:
        ValueError: If a snapshot lacks a parameter or has another shape, or ``wasserstein_p``
            is not 1 or 2.

    Example::

        >>> import functools
        >>> import operator
        >>> from collections import OrderedDict
        >>> import torch
        >>> from torch import nn
        >>> from lightning_plasticity.measures import snapshot_parameters
        >>> from lightning_plasticity.measures.parameter_stats import parameter_stat_sums
        >>> body = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        >>> model = nn.Sequential(OrderedDict(encoder=body, head=nn.Linear(4, 2)))
        >>> init = snapshot_parameters(model)
        >>> with torch.no_grad():
        ...     _ = model.head.weight.add_(0.5)  # only the head moves
        >>> sums = parameter_stat_sums(list(model.named_parameters()), init=init)
        >>> encoder = functools.reduce(
        ...     operator.add, [s for n, s in sums.items() if n.startswith("encoder.")]
        ... )
        >>> encoder.numel, encoder.init_sq_dist, round(sums["head.weight"].init_sq_dist, 4)
        (16, 0.0, 2.0)
    """
    if wasserstein_p not in (1, 2):
        raise ValueError(f"wasserstein_p must be 1 or 2, got {wasserstein_p}.")
    out: dict[str, ParameterStatSums] = {}
    with torch.no_grad():
        for name, p in params:
            theta = p.detach().to(torch.float64)
            values: dict[str, float | int] = {
                "numel": theta.numel(),
                "sq_sum": float(theta.square().sum()),
                "abs_sum": float(theta.abs().sum()),
            }
            if init is not None:
                theta0 = _snapshot_value(init, name, p, "init")
                values["init_numel"] = theta.numel()
                values["init_sq_dist"] = float((theta - theta0).square().sum())
                diff = (theta.flatten().sort().values - theta0.flatten().sort().values).abs()
                values["wasserstein_sum"] = float(diff.pow(wasserstein_p).sum())
            if previous is not None:
                prev = _snapshot_value(previous, name, p, "previous")
                values["prev_sq_dist"] = float((theta - prev).square().sum())
            if p.grad is not None:
                values["grad_sq_sum"] = float(p.grad.detach().to(torch.float64).square().sum())
                values["num_grads"] = 1
            if stable_rank and theta.dim() >= 2 and theta.numel() > 0:
                values["stable_rank_sum"] = _stable_rank(theta)
                values["num_matrices"] = 1
            out[name] = ParameterStatSums(**values)  # type: ignore[arg-type]
    return out


def _layer_name(param_name: str) -> str:
    if ".parametrizations." in param_name:
        return param_name.split(".parametrizations.")[0]
    if param_name.startswith("parametrizations."):
        return "(root)"
    return param_name.rsplit(".", 1)[0] if "." in param_name else "(root)"


def _group_stats(s: ParameterStatSums, wasserstein_p: int) -> ParameterGroupStats:
    def root(x: float) -> float:
        return math.sqrt(x) if not math.isnan(x) else _NAN

    wasserstein = (
        (s.wasserstein_sum / s.init_numel) ** (1 / wasserstein_p)
        if s.init_numel > 0 and not math.isnan(s.wasserstein_sum)
        else _NAN
    )
    return ParameterGroupStats(
        numel=s.numel,
        norm=math.sqrt(s.sq_sum),
        mean_abs=s.abs_sum / s.numel if s.numel > 0 else _NAN,
        distance_from_init=root(s.init_sq_dist),
        wasserstein=wasserstein,
        stable_rank=s.stable_rank_sum / s.num_matrices if s.num_matrices > 0 else _NAN,
        update_norm=root(s.prev_sq_dist),
        grad_norm=root(s.grad_sq_sum) if s.num_grads > 0 else _NAN,
    )


def parameter_stats_from_sums(
    sums: Mapping[str, ParameterStatSums], *, wasserstein_p: Literal[1, 2] = 1
) -> ParameterStats:
    """Per-tensor, per-layer and total statistics from :func:`parameter_stat_sums`.

    Args:
        sums: Parameter name -> sums.
        wasserstein_p: The ``p`` the sums were computed with.

    Returns:
        A :class:`ParameterStats`.

    Example::

        >>> from torch import nn
        >>> from lightning_plasticity.measures import select_parameters, snapshot_parameters
        >>> from lightning_plasticity.measures.parameter_stats import (
        ...     parameter_stat_sums, parameter_stats_from_sums,
        ... )
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> init = snapshot_parameters(model)
        >>> named = select_parameters(model, last_n_layers=1)
        >>> stats = parameter_stats_from_sums(parameter_stat_sums(named, init=init))
        >>> sorted(stats.tensors), sorted(stats.layers), stats.total.numel
        (['2.bias', '2.weight'], ['2'], 10)
    """
    if not sums:
        raise ValueError("no parameters to measure; the model or the selection is empty.")
    tensors = {name: _group_stats(s, wasserstein_p) for name, s in sums.items()}
    layer_sums: dict[str, ParameterStatSums] = {}
    for name, s in sums.items():
        layer = _layer_name(name)
        layer_sums[layer] = layer_sums[layer] + s if layer in layer_sums else s
    layers = {name: _group_stats(s, wasserstein_p) for name, s in layer_sums.items()}
    items = list(sums.values())
    total = items[0]
    for s in items[1:]:
        total = total + s
    return ParameterStats(
        tensors=tensors,
        layers=layers,
        total=_group_stats(total, wasserstein_p),
        wasserstein_p=wasserstein_p,
    )


def parameter_stats(
    model: nn.Module,
    init: Mapping[str, Tensor] | None = None,
    previous: Mapping[str, Tensor] | None = None,
    *,
    params: NamedParams | None = None,
    wasserstein_p: Literal[1, 2] = 1,
    stable_rank: bool = True,
) -> ParameterStats:
    """Norms, distance from init, Wasserstein drift, stable rank, update and gradient norms.

    Definitions in the module docstring. The model is only read. Under DDP every rank gets the
    same result without any collective (parameters and gradients are replicated).

    Args:
        model: The model.
        init: ``name -> initial values`` (:func:`snapshot_parameters`); without it the
            distance and Wasserstein fields are ``nan``.
        previous: ``name -> earlier values`` (e.g. at the start of the task); without it
            ``update_norm`` is ``nan``.
        params: ``(name, parameter)`` pairs to measure (``select_parameters(model, ...)``);
            default all of ``model.named_parameters()``, frozen ones included.
        wasserstein_p: 1 (``W1``) or 2 (``W2``).
        stable_rank: Compute stable ranks (one SVD per matrix; turn off for large models).

    Returns:
        A :class:`ParameterStats`.

    Raises:
        ValueError: If a snapshot lacks a parameter or has another shape, or on a bad option.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.measures import parameter_stats, snapshot_parameters
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> init = snapshot_parameters(model)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 2)
        >>> for _ in range(5):  # train
        ...     optimizer.zero_grad()
        ...     F.mse_loss(model(x), y).backward()
        ...     optimizer.step()
        >>> stats = parameter_stats(model, init=init)
        >>> stats.total.distance_from_init > 0, 1 <= stats.layers["0"].stable_rank <= 3
        (True, True)
        >>> sorted(stats.layers), stats.total.numel
        (['0', '2'], 26)
    """
    named = list(model.named_parameters()) if params is None else list(params)
    sums = parameter_stat_sums(
        named, init, previous, wasserstein_p=wasserstein_p, stable_rank=stable_rank
    )
    return parameter_stats_from_sums(sums, wasserstein_p=wasserstein_p)
