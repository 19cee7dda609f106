"""Rank of a feature matrix: effective rank, srank and (eps-)feature rank.

For features ``F`` of shape ``(n, d)`` (one row per probe input, e.g. the penultimate
representation ``model.features(x)``) with singular values ``sigma_1 >= ... >= sigma_m``,
``m = min(n, d)``:

* effective rank (Roy & Vetterli, 2007, "The effective rank: A measure of effective
  dimensionality"): ``exp(H(p))`` with ``p_i = sigma_i / sum_j sigma_j`` and ``H`` the Shannon
  entropy (computed on the singular values, not their squares).
* srank (Kumar et al., 2021, "Implicit under-parameterization inhibits data-efficient deep
  reinforcement learning"): ``srank_delta = min{k : sum_{i<=k} sigma_i / sum_i sigma_i >= 1 -
  delta}``, ``delta = 0.01``. Kumar et al. use the singular values themselves; several later
  implementations use the squared singular values (the explained variance of PCA), which gives
  a smaller number: ``squared=True``.
* feature rank (Lyle et al., 2022, "Understanding and preventing capacity loss in reinforcement
  learning"): the number of singular values of ``F / sqrt(n)`` above ``eps = 0.01``, i.e.
  ``#{sigma_i / sqrt(n) > eps}`` (``threshold="sqrt_n"``, the default). Normalising by
  ``sqrt(n)`` makes the count independent of the probe size for i.i.d. inputs (``sigma_i^2 / n``
  are the eigenvalues of the uncentred feature covariance ``F^T F / n``). Alternatives:
  ``threshold="absolute"`` (``sigma_i > eps``) and ``threshold="relative"``
  (``sigma_i > eps * sigma_1``, the usual numerical rank).
* feature norm: the mean L2 norm of the rows, ``(1/n) sum_x ||f(x)||``.

DDP
---
The singular values of ``F`` stacked from the shards of all ranks are the square roots of the
eigenvalues of the ``d x d`` Gram matrix ``F^T F = sum_r F_r^T F_r``, a sum over ranks.
:func:`feature_gram_stats` returns that Gram matrix, the number of rows and the sum of the row
norms of one shard; summed across ranks (:func:`reduce_feature_gram_stats`) they give exactly the
single-process statistics, and :func:`feature_rank_from_gram` the metrics. Squaring costs
precision: singular values below about ``sqrt(eps_float64) * sigma_1 ~ 1.5e-8 sigma_1`` are
rounding noise on the Gram path (the direct SVD path resolves ``~1e-16 sigma_1``), which does not
matter for the thresholds above. The Gram path keeps the ``min(n, d)`` largest values, like the
SVD.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_plasticity.core.reduction import reduce_stats, stat
from lightning_plasticity.measures.spectral_stats import effective_rank

__all__ = [
    "FeatureGramStats",
    "FeatureRank",
    "feature_gram_stats",
    "feature_rank",
    "feature_rank_from_gram",
    "feature_rank_from_singular_values",
    "reduce_feature_gram_stats",
    "srank",
]

#: Sums a tensor across DDP ranks (``all_reduce(SUM)``), or ``None``.
ReduceSum = Callable[[Tensor], Tensor]
ThresholdMode = Literal["sqrt_n", "absolute", "relative"]
_THRESHOLD_MODES = ("sqrt_n", "absolute", "relative")


@dataclass(frozen=True)
class FeatureRank:
    """Rank summaries of a feature matrix.

    Attributes:
        singular_values: ``(min(n, d),)`` float64, descending.
        effective_rank: ``exp(H(sigma / sum sigma))`` (Roy & Vetterli, 2007).
        srank: ``srank_delta`` (Kumar et al., 2021), on ``sigma`` or ``sigma**2`` (``squared``).
        feature_rank: ``#{sigma_i > threshold}``.
        feature_norm: Mean L2 norm of the rows of ``F``.
        num_examples: ``n``.
        dim: ``d``.
        threshold: The absolute threshold on ``sigma`` used for ``feature_rank``
            (``eps * sqrt(n)``, ``eps`` or ``eps * sigma_1``).
        delta: The srank ``delta``.
        squared: Whether srank used squared singular values.
    """

    singular_values: Tensor
    effective_rank: float
    srank: int
    feature_rank: int
    feature_norm: float
    num_examples: int
    dim: int
    threshold: float
    delta: float
    squared: bool

    def scalars(self) -> dict[str, float]:
        """``effective_rank``, ``srank``, ``feature_rank``, ``feature_norm`` and the rank
        fractions (over ``min(n, d)``) as floats, for logging.

        Example::

            >>> import torch
            >>> from lightning_plasticity.measures.feature_rank import feature_rank
            >>> _ = torch.manual_seed(0)
            >>> result = feature_rank(torch.randn(100, 2) @ torch.randn(2, 8))
            >>> logged = {f"features/{k}": v for k, v in result.scalars().items()}
            >>> sorted(logged)  # doctest: +NORMALIZE_WHITESPACE
            ['features/effective_rank', 'features/feature_norm', 'features/feature_rank',
             'features/feature_rank_fraction', 'features/srank', 'features/srank_fraction']
            >>> logged["features/feature_rank"], logged["features/feature_rank_fraction"]
            (2.0, 0.25)
            >>> # in a LightningModule or Callback hook: pl_module.log_dict(logged)
        """
        m = max(1, min(self.num_examples, self.dim))
        return {
            "effective_rank": self.effective_rank,
            "srank": float(self.srank),
            "feature_rank": float(self.feature_rank),
            "feature_rank_fraction": self.feature_rank / m,
            "srank_fraction": self.srank / m,
            "feature_norm": self.feature_norm,
        }

    def spectra(self) -> dict[str, Tensor]:
        """1-D spectra for histograms: ``singular_values``."""
        return {"singular_values": self.singular_values}


@dataclass(frozen=True)
class FeatureGramStats:
    """Sufficient statistics of a feature shard; sums over rows, so shards add up.

    Attributes:
        gram: ``(d, d)`` float64 ``F^T F``.
        num_examples: 0-d float64, number of rows.
        norm_sum: 0-d float64, sum of the rows' L2 norms.
    """

    gram: Tensor = stat("sum")
    num_examples: Tensor = stat("sum")
    norm_sum: Tensor = stat("sum")


def _as_matrix(features: Tensor) -> Tensor:
    if not isinstance(features, Tensor) or features.dim() < 2:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(
            f"features must be a tensor of shape (n, d) (or (n, ...), flattened), got {shape}."
        )
    return features.detach().reshape(features.shape[0], -1).to(torch.float64)


def srank(values: Tensor, delta: float = 0.01, *, squared: bool = False) -> int:
    """``min{k : sum_{i<=k} v_i / sum_i v_i >= 1 - delta}`` over values sorted descending.

    Kumar et al. (2021) use singular values (``squared=False``); ``squared=True`` applies the
    rule to ``v_i ** 2`` (explained variance). An all-zero or empty spectrum has srank 0.

    Args:
        values: 1-D nonnegative values (singular values).
        delta: In ``[0, 1)``.
        squared: Square the values first.

    Returns:
        An ``int`` between 0 and ``len(values)``.

    Example::

        >>> import torch
        >>> from lightning_plasticity.measures import srank
        >>> srank(torch.tensor([1.0, 1.0, 0.0]), delta=0.01)
        2
        >>> values = torch.tensor([3.0, 1.0])  # 75% of the sum, 90% of the squared sum
        >>> srank(values, delta=0.1), srank(values, delta=0.1, squared=True)
        (2, 1)
    """
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta} (Kumar et al. use 0.01).")
    v = values.detach().to(torch.float64).flatten()
    if bool((v < 0).any()):
        raise ValueError("srank() expects nonnegative values (singular values).")
    v = torch.sort(v, descending=True).values
    if squared:
        v = v.square()
    total = v.sum()
    if v.numel() == 0 or total <= 0:
        return 0
    cumulative = torch.cumsum(v, 0) / total
    # A few ulps of slack so that exact ties (e.g. k equal values with delta=0) are not lost to
    # rounding in the cumulative sum.
    target = (1 - delta) - 8 * v.numel() * torch.finfo(torch.float64).eps
    below = int((cumulative < target).sum())
    return min(below + 1, v.numel())


def _check_options(delta: float, eps: float, threshold: str) -> None:
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta} (Kumar et al. use 0.01).")
    if eps < 0:
        raise ValueError(f"eps must be nonnegative, got {eps} (Lyle et al. use 0.01).")
    if threshold not in _THRESHOLD_MODES:
        raise ValueError(
            f"threshold must be one of {', '.join(map(repr, _THRESHOLD_MODES))}, got "
            f"{threshold!r}."
        )


def feature_rank_from_singular_values(
    singular_values: Tensor,
    num_examples: int,
    dim: int,
    feature_norm: float = math.nan,
    *,
    delta: float = 0.01,
    squared: bool = False,
    eps: float = 0.01,
    threshold: ThresholdMode = "sqrt_n",
) -> FeatureRank:
    """Rank summaries from the singular values of an ``(n, d)`` feature matrix.

    Args:
        singular_values: 1-D nonnegative singular values (any order).
        num_examples: ``n`` (for the ``"sqrt_n"`` threshold).
        dim: ``d``.
        feature_norm: Mean row norm to report (``nan`` if unknown).
        delta: srank ``delta``.
        squared: srank on squared singular values.
        eps: Feature-rank threshold (see ``threshold``).
        threshold: ``"sqrt_n"`` (``sigma / sqrt(n) > eps``, Lyle et al. 2022), ``"absolute"``
            (``sigma > eps``) or ``"relative"`` (``sigma > eps * sigma_1``).

    Returns:
        A :class:`FeatureRank`.

    Example::

        >>> import torch
        >>> from lightning_plasticity.measures.feature_rank import (
        ...     feature_rank_from_singular_values,
        ... )
        >>> r = feature_rank_from_singular_values(torch.tensor([3.0, 2.0, 0.0]), 10, 3)
        >>> r.feature_rank, r.srank
        (2, 2)
        >>> round(r.threshold, 4)  # eps * sqrt(n) = 0.01 * sqrt(10)
        0.0316
    """
    _check_options(delta, eps, threshold)
    s = torch.sort(singular_values.detach().to(torch.float64).flatten(), descending=True).values
    s = s.clamp_min(0)
    top = float(s[0]) if s.numel() else 0.0
    if threshold == "sqrt_n":
        cut = eps * math.sqrt(num_examples)
    elif threshold == "absolute":
        cut = eps
    else:
        cut = eps * top
    return FeatureRank(
        singular_values=s,
        effective_rank=float(effective_rank(s)),
        srank=srank(s, delta, squared=squared),
        feature_rank=int((s > cut).sum()),
        feature_norm=float(feature_norm),
        num_examples=int(num_examples),
        dim=int(dim),
        threshold=float(cut),
        delta=float(delta),
        squared=bool(squared),
    )


def feature_gram_stats(features: Tensor) -> FeatureGramStats:
    """Gram matrix ``F^T F``, row count and row-norm sum of a feature shard (float64).

    Args:
        features: ``(n, d)`` features (``(n, ...)`` is flattened).

    Returns:
        A :class:`FeatureGramStats`.

    Example::

        >>> import torch
        >>> from lightning_plasticity.measures.feature_rank import (
        ...     feature_gram_stats, feature_rank_from_gram, reduce_feature_gram_stats,
        ... )
        >>> _ = torch.manual_seed(0)
        >>> f_shard = torch.randn(100, 2) @ torch.randn(2, 8)  # this rank's features
        >>> # Under DDP: all_reduce_sum(t) calls torch.distributed.all_reduce(t) and returns t.
        >>> # Here two ranks that hold the same shard are simulated:
        >>> all_reduce_sum = lambda t: 2 * t
        >>> stats = reduce_feature_gram_stats(feature_gram_stats(f_shard), all_reduce_sum)
        >>> stats.gram.shape, int(stats.num_examples)
        (torch.Size([8, 8]), 200)
        >>> result = feature_rank_from_gram(stats)
        >>> result.feature_rank, result.num_examples
        (2, 200)
    """
    F = _as_matrix(features)
    return FeatureGramStats(
        gram=F.T @ F,
        num_examples=torch.tensor(float(F.shape[0]), dtype=torch.float64, device=F.device),
        norm_sum=torch.linalg.vector_norm(F, dim=1).sum(),
    )


def reduce_feature_gram_stats(stats: FeatureGramStats, reduce_sum: ReduceSum) -> FeatureGramStats:
    """Sum the statistics across ranks with one call of ``reduce_sum`` on a flat tensor.

    Example::

        >>> import torch
        >>> from lightning_plasticity.measures.feature_rank import (
        ...     feature_gram_stats, reduce_feature_gram_stats,
        ... )
        >>> f_shard = torch.ones(10, 4)  # this rank's features
        >>> all_reduce_sum = lambda t: 3 * t  # stands in for all_reduce(SUM) over 3 equal ranks
        >>> total = reduce_feature_gram_stats(feature_gram_stats(f_shard), all_reduce_sum)
        >>> int(total.num_examples), float(total.gram[0, 0]), float(total.norm_sum)
        (30, 30.0, 60.0)
    """
    return reduce_stats(stats, lambda t, op: reduce_sum(t))

def feature_rank_from_gram(
    stats: FeatureGramStats,
    *,
    delta: float = 0.01,
    squared: bool = False,
    eps: float = 0.01,
    threshold: ThresholdMode = "sqrt_n",
) -> FeatureRank:
    """Rank summaries from (summed) Gram statistics: ``sigma_i = sqrt(eig_i(F^T F))``.

    Eigenvalues are clamped at zero before the square root and the ``min(n, d)`` largest are
    kept. See the module docstring for the precision of this path and the options.

    Example::

        >>> import torch
        >>> from lightning_plasticity.measures.feature_rank import (
        ...     feature_gram_stats, feature_rank, feature_rank_from_gram,
        ... )
        >>> _ = torch.manual_seed(0)
        >>> features = torch.randn(100, 2) @ torch.randn(2, 8)  # 100 rows of 8 features, rank 2
        >>> result = feature_rank_from_gram(feature_gram_stats(features))
        >>> result.feature_rank, result.srank, result.num_examples, result.dim
        (2, 2, 100, 8)
        >>> direct = feature_rank(features, method="svd")
        >>> abs(result.effective_rank - direct.effective_rank) < 1e-4
        True
    """
    _check_options(delta, eps, threshold)
    gram = stats.gram.to(torch.float64)
    gram = (gram + gram.T) / 2
    n = int(round(float(stats.num_examples)))
    d = gram.shape[0]
    eig = torch.linalg.eigvalsh(gram).clamp_min(0).flip(0)
    s = eig[: min(n, d)].sqrt()
    norm = float(stats.norm_sum) / n if n > 0 else math.nan
    return feature_rank_from_singular_values(
        s, n, d, norm, delta=delta, squared=squared, eps=eps, threshold=threshold
    )


def feature_rank(
    features: Tensor,
    *,
    delta: float = 0.01,
    squared: bool = False,
    eps: float = 0.01,
    threshold: ThresholdMode = "sqrt_n",
    method: Literal["auto", "svd", "gram"] = "auto",
    reduce_sum: ReduceSum | None = None,
) -> FeatureRank:
    """Effective rank, srank, feature rank and feature norm of a feature matrix.

    Definitions in the module docstring. Computed in float64.

    Args:
        features: ``(n, d)`` features, one row per probe input (this rank's shard under DDP).
        delta: srank ``delta`` (Kumar et al., 2021: 0.01).
        squared: srank on squared singular values.
        eps: Feature-rank threshold (Lyle et al., 2022: 0.01 on ``sigma / sqrt(n)``).
        threshold: ``"sqrt_n"``, ``"absolute"`` or ``"relative"``.
        method: ``"svd"`` (singular values of ``F``), ``"gram"`` (eigenvalues of ``F^T F``) or
            ``"auto"``: ``"gram"`` with ``reduce_sum``, else ``"svd"``.
        reduce_sum: Sums a tensor across ranks; requires the Gram path. The result equals one
            process on the features of all ranks stacked.

    Returns:
        A :class:`FeatureRank`.

    Raises:
        ValueError: On a bad option or ``method="svd"`` with ``reduce_sum``.

    Example::

        >>> import torch
        >>> from lightning_plasticity.measures.feature_rank import feature_rank
        >>> from lightning_plasticity.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> model, x = MLP((8,), 3, width=16, depth=2), torch.randn(64, 8)
        >>> result = feature_rank(model.features(x))
        >>> result.num_examples, result.dim
        (64, 16)
        >>> round(result.effective_rank, 1), result.srank, result.feature_rank
        (10.2, 16, 16)
    """
    _check_options(delta, eps, threshold)
    if method not in ("auto", "svd", "gram"):
        raise ValueError(f"method must be 'auto', 'svd' or 'gram', got {method!r}.")
    if method == "svd" and reduce_sum is not None:
        raise ValueError(
            "method='svd' cannot combine the features of several ranks; use method='gram' (or "
            "'auto') with reduce_sum."
        )
    options = {"delta": delta, "squared": squared, "eps": eps, "threshold": threshold}
    if method == "gram" or reduce_sum is not None:
        stats = feature_gram_stats(features)
        if reduce_sum is not None:
            stats = reduce_feature_gram_stats(stats, reduce_sum)
        return feature_rank_from_gram(stats, **options)
    F = _as_matrix(features)
    n, d = F.shape
    s = torch.linalg.svdvals(F)
    norm = float(torch.linalg.vector_norm(F, dim=1).mean()) if n > 0 else math.nan
    return feature_rank_from_singular_values(s, n, d, norm, **options)
