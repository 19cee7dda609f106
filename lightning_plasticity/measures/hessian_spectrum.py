"""Hessian spectrum measurements: extreme eigenvalues, eps-rank, spectral density.

Lewandowski et al. ("Directions of curvature as an explanation for loss of plasticity",
2023/24) explain loss of plasticity by the loss of *directions of curvature*: the number of
Hessian eigenvalues that are not negligible shrinks as a network loses the ability to learn.
:func:`hessian_eps_rank` measures that number exactly (dense) or by deflated stochastic Lanczos
quadrature, :func:`hessian_eigenvalues` gives the extreme eigenpairs and
:func:`spectral_density` the smoothed eigenvalue density (Ghorbani et al. 2019).

All functions follow the measurement convention of :mod:`lightning_plasticity.measures`:
``fn(model, loss_fn, batch, *, params=None, reduce=None, ...)``; they never modify the model
(see :class:`~lightning_plasticity.measures.hvp.HessianVectorProduct`) and draw random vectors
from a generator seeded by ``seed``, so all DDP ranks compute identical results.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_plasticity.measures.hvp import (
    DEFAULT_MAX_DENSE_MEMORY_BYTES,
    DEFAULT_MAX_DENSE_PARAMS,
    HessianVectorProduct,
    LossFn,
    NamedParams,
    Reduce,
)
from lightning_plasticity.measures.lanczos import (
    SLQResult,
    _default_tol,
    _generator,
    _grid_and_sigma,
    _LanczosProcess,
    count_from_slq,
    radau_count,
    slq,
    top_eigenpairs,
)
from lightning_plasticity.measures.linear_operator import LinearOperator, ProjectedOperator

__all__ = [
    "EpsRank",
    "HessianEigenpairs",
    "SpectralDensity",
    "effective_rank",
    "eps_rank_of_matrix",
    "hessian_eigenvalues",
    "hessian_eps_rank",
    "spectral_density",
]

_F64 = torch.float64


# ----------------------------------------------------------------------------- eigenpairs
@dataclass(frozen=True)
class HessianEigenpairs:
    """Extreme eigenpairs of the Hessian.

    Attributes:
        eigenvalues: ``(k,)`` float64, ordered as requested (``"LA"``: descending, ``"SA"``:
            ascending, i.e. most negative first, ``"LM"``: descending magnitude).
        eigenvectors: ``(num_params, k)`` orthonormal columns (the parameters' dtype) over the
            flat concatenation of the selected parameters.
        residuals: ``(k,)`` ``||H v - lambda v||``.
        converged: ``(k,)`` bool, residual ``<= tol * max |eigenvalue|``.
        num_params: Number of parameters the Hessian covers.
        loss: The (reduced) loss on the batch.
        num_matvecs: Hessian-vector products used.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    num_params: int
    loss: float
    num_matvecs: int


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    k: int = 20,
    which: Literal["LA", "SA", "LM"] = "LA",
    *,
    params: NamedParams | None = None,
    reduce: Reduce | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    seed: int = 0,
    backend: Literal["torch", "scipy"] = "torch",
) -> HessianEigenpairs:
    """Top-``k`` Hessian eigenpairs by Lanczos with full reorthogonalisation.

    Args:
        model: The model (not modified).
        loss_fn: ``loss_fn(model, batch)`` returns the scalar mean loss.
        batch: The probe batch.
        k: Number of eigenpairs (capped at the number of parameters).
        which: ``"LA"`` largest, ``"SA"`` most negative, ``"LM"`` largest magnitude.
        params: Parameter block from :func:`select_parameters`; default all trainable.
        reduce: Cross-rank average for DDP (see :class:`HessianVectorProduct`).
        tol: Relative residual tolerance (default ``sqrt(eps)`` of the parameter dtype).
        max_iter: Largest Krylov dimension (default ``max(200, 6 k)``).
        seed: Seed of the Lanczos start vector.
        backend: ``"torch"`` or ``"scipy"`` (ARPACK), see :func:`top_eigenpairs`.

    Returns:
        A :class:`HessianEigenpairs`.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.measures import hessian_eigenvalues
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])
        >>> res = hessian_eigenvalues(model, loss_fn, (x, y), k=5)
        >>> res.eigenvalues.shape, res.eigenvectors.shape, res.num_params
        (torch.Size([5]), torch.Size([26, 5]), 26)
        >>> bool(res.converged.all())
        True
        >>> sharpness = res.eigenvalues[0]
        >>> most_negative = hessian_eigenvalues(model, loss_fn, (x, y), k=1, which="SA")
        >>> bool(most_negative.eigenvalues[0] < 0 < sharpness)
        True
    """
    with HessianVectorProduct(model, loss_fn, batch, params, reduce) as hvp:
        res = top_eigenpairs(hvp, min(k, hvp.num_params), which=which, tol=tol,
                             max_iter=max_iter, seed=seed, backend=backend)
        return HessianEigenpairs(
            eigenvalues=res.eigenvalues,
            eigenvectors=res.eigenvectors,
            residuals=res.residuals,
            converged=res.converged,
            num_params=hvp.num_params,
            loss=float(hvp.loss),
            num_matvecs=res.num_matvecs,
        )


# ----------------------------------------------------------------------------- eps-rank
@dataclass(frozen=True)
class EpsRank:
    """The eps-rank of the Hessian and related spectrum summaries.

    Attributes:
        eps_rank: ``#{i : |lambda_i| > threshold}``; an integer-valued float when exact
            (dense), an estimate otherwise.
        normalized_rank: ``eps_rank / num_params`` in ``[0, 1]``.
        effective_rank: Roy & Vetterli (2007) effective rank ``exp(H(p))`` with
            ``p_i = |lambda_i| / sum_j |lambda_j|`` and ``H`` the Shannon entropy (an SLQ
            estimate for ``method="lanczos"``).
        num_params: Number of parameters the Hessian covers.
        top_eigenvalue: The eigenvalue of largest magnitude (signed).
        threshold: The absolute threshold used (``eps`` or ``eps * |top_eigenvalue|``).
        error_estimate: 0 for dense; for Lanczos, a ~95% error bar for ``eps_rank``: twice
            the Monte Carlo standard error of the SLQ part and its quadrature uncertainty
            (the spread of the count over Lanczos depths) combined -- see
            :func:`hessian_eps_rank`.
        method: ``"dense"`` or ``"lanczos"``.
        eigenvalues: float64, descending by magnitude: all eigenvalues (dense) or the
            converged Ritz values found by Lanczos (``method="lanczos"``).
        eps: The ``eps`` argument.
        relative: The ``relative`` argument.
        loss: The (reduced) loss on the batch.
        num_matvecs: Hessian-vector products used.
        num_deflated: Converged Ritz pairs of the deflation run (``"lanczos"``; their
            eigenvalues are exact, the rest of the spectrum is estimated).
    """

    eps_rank: float
    normalized_rank: float
    effective_rank: float
    num_params: int
    top_eigenvalue: float
    threshold: float
    error_estimate: float
    method: str
    eigenvalues: Tensor
    eps: float
    relative: bool
    loss: float
    num_matvecs: int
    num_deflated: int = 0

    def scalars(self) -> dict[str, float]:
        """The logged keys: ``hessian_eps_rank``, ``hessian_eps_rank_normalized``,
        ``hessian_eps_rank_error``, ``hessian_effective_rank``, ``hessian_top_eigenvalue``,
        ``hessian_num_params``."""
        return {
            "hessian_eps_rank": float(self.eps_rank),
            "hessian_eps_rank_normalized": float(self.normalized_rank),
            "hessian_eps_rank_error": float(self.error_estimate),
            "hessian_effective_rank": float(self.effective_rank),
            "hessian_top_eigenvalue": float(self.top_eigenvalue),
            "hessian_num_params": float(self.num_params),
        }


def effective_rank(eigenvalues: Tensor) -> float:
    """Roy & Vetterli (2007) effective rank of a spectrum: ``exp(entropy(|l| / sum |l|))``.

    Args:
        eigenvalues: Eigenvalues (or singular values); signs are ignored.

    Returns:
        A value in ``[1, len(eigenvalues)]``, or 0 for an all-zero spectrum.

    Example::

        >>> import torch
        >>> from lightning_plasticity.measures.hessian_spectrum import effective_rank
        >>> round(effective_rank(torch.tensor([1.0, 1.0, 0.0])), 6)
        2.0
        >>> round(effective_rank(torch.tensor([-3.0, 3.0, 3.0])), 6)  # signs are ignored
        3.0
    """
    a = eigenvalues.detach().to(_F64).abs()
    total = float(a.sum())
    if total <= 0 or not math.isfinite(total):
        return 0.0
    p = a[a > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def _abs_log_abs(t: Tensor) -> Tensor:
    a = t.abs()
    return torch.where(a > 0, a * a.clamp_min(1e-300).log(), torch.zeros_like(a))


def _dense_eig_extra_bytes(hvp: HessianVectorProduct) -> int:
    """Memory beyond :meth:`HessianVectorProduct.dense_memory_bytes` for a float64
    eigendecomposition: the float64 matrix and LAPACK's working copy (16 n^2 bytes peak)."""
    return max(0, 16 * hvp.num_params**2 - hvp.dense_memory_bytes())


def _eps_rank_dense(
    hvp: HessianVectorProduct, eps: float, relative: bool, max_params: int | None,
    max_memory_bytes: int | None,
) -> EpsRank:
    hvp.check_dense(max_params, max_memory_bytes, extra_bytes=_dense_eig_extra_bytes(hvp))
    H = hvp.dense(max_params=None, max_memory_bytes=None)
    return eps_rank_of_matrix(H, eps, relative, loss=float(hvp.loss))


def eps_rank_of_matrix(
    H: Tensor, eps: float = 1e-3, relative: bool = True, *, loss: float = float("nan"),
) -> EpsRank:
    """The exact eps-rank of a symmetric matrix, e.g. a dense Hessian from
    :meth:`HessianVectorProduct.dense`: ``torch.linalg.eigvalsh`` in float64, then the count of
    ``|lambda| > threshold`` as in :func:`hessian_eps_rank` (``method="dense"``).

    It is the second half of the dense method, split off so that a caller can build the
    matrix (which needs the model, and collectives under DDP) and run the ``O(n^3)``
    eigensolve elsewhere, e.g. on a background thread while training goes on.

    Args:
        H: ``(n, n)`` symmetric matrix (float32 or float64).
        eps: Threshold, relative to ``|lambda_max|`` or absolute (``> 0``).
        relative: Whether ``eps`` is relative to the largest-magnitude eigenvalue.
        loss: The loss the matrix is the Hessian of, recorded in the result.

    Returns:
        An :class:`EpsRank` with ``method="dense"`` and ``error_estimate=0``.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.measures import HessianVectorProduct, eps_rank_of_matrix
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])
        >>> with HessianVectorProduct(model, loss_fn, (x, y)) as hvp:
        ...     H = hvp.dense()
        >>> eps_rank_of_matrix(H, eps=1e-3).eps_rank
        19.0
    """
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps}.")
    if H.dim() != 2 or H.shape[0] != H.shape[1] or H.shape[0] == 0:
        raise ValueError(f"H must be a non-empty square matrix, got shape {tuple(H.shape)}.")
    n = H.shape[0]
    # eigvalsh runs in float64: counting eigenvalues 1e-3 below the top one must not be
    # decided by the eigensolver's float32 rounding.
    H = H.to(_F64)
    ev = torch.linalg.eigvalsh(H).cpu()
    del H
    ev = ev[torch.argsort(ev.abs(), descending=True)]
    top = float(ev[0])
    threshold = eps * abs(top) if relative else eps
    rank = float(int((ev.abs() > threshold).sum()))
    return EpsRank(
        eps_rank=rank,
        normalized_rank=rank / n,
        effective_rank=effective_rank(ev),
        num_params=n,
        top_eigenvalue=top,
        threshold=float(threshold),
        error_estimate=0.0,
        method="dense",
        eigenvalues=ev,
        eps=eps,
        relative=relative,
        loss=loss,
        num_matvecs=n,
    )


@dataclass(frozen=True)
class _DeflatedSLQ:
    """Internal result of the deflated SLQ estimate on an abstract operator."""

    count: float
    error_estimate: float
    standard_error: float
    quadrature_error: float
    top: float
    threshold: float
    ritz_values: Tensor  # converged, deflated Ritz values
    effective_rank: float
    num_matvecs: int
    num_deflated: int


def _deflated_slq_count(
    A: LinearOperator,
    eps: float,
    relative: bool,
    num_lanczos_iter: int,
    num_probes: int,
    num_slq_iter: int,
    seed: int,
    tol: float | None,
    reorthogonalize: bool = False,
    rule: str = "depth",
    block_size: int = 8,
) -> _DeflatedSLQ:
    """Deflated SLQ count of ``|lambda| > threshold`` for a symmetric operator.

    1. Lanczos (full reorthogonalisation) for ``num_lanczos_iter`` steps; the largest-magnitude
       Ritz value sets a relative threshold. Ritz pairs whose residual is below both
       ``tol * |top|`` and a tenth of the threshold are *converged*: each is within its
       residual of a true eigenvalue, so those above the threshold are counted exactly.
    2. The converged eigenvectors ``V`` are deflated: the remaining count is the SLQ count of
       ``P A P`` with ``P = I - V V^T`` (a :class:`ProjectedOperator`; the ``d`` deflated
       directions become zeros, below any positive threshold). Deflation removes the outliers
       that set the width of the spectrum, so the same number of quadrature nodes resolves the
       threshold much better.
    """
    n = A.n
    start_count = A.num_matvecs
    m1 = min(n, num_lanczos_iter)
    proc = _LanczosProcess(A, _generator(seed), capacity=m1)
    proc.extend(m1)
    theta, S, res = proc.ritz()
    top_i = int(theta.abs().argmax())
    top = float(theta[top_i])
    threshold = eps * abs(top) if relative else eps
    tol = _default_tol(A.dtype) if tol is None else tol
    conv = (res <= tol * abs(top)) & (res <= 0.1 * threshold)
    ritz = theta[conv]
    exact = int((ritz.abs() > threshold).sum())
    abs_sum = float(ritz.abs().sum())
    abs_log_sum = float(_abs_log_abs(ritz).sum())

    if int(conv.sum()) >= n or proc.m >= n:
        # The Krylov space is the whole space (tiny n): everything is exact.
        count = float(int((theta.abs() > threshold).sum()))
        return _DeflatedSLQ(count, 0.0, 0.0, 0.0, top, threshold,
                            theta[torch.argsort(theta.abs(), descending=True)],
                            effective_rank(theta), A.num_matvecs - start_count, len(theta))

    V = (proc.basis @ S[:, conv].to(proc.device, proc.bdt)).contiguous()  # (n, d)
    del proc
    deflated = ProjectedOperator(A, V, assume_projected=True)
    res_slq: SLQResult = slq(deflated, num_probes, num_slq_iter, seed + 1,
                             block_size=block_size, reorthogonalize=reorthogonalize)
    count, standard_error, quad = _slq_count(res_slq, threshold, rule)
    # Effective rank: tr|H| and tr(|H| log |H|) = exact (deflated) part + SLQ remainder.
    abs_sum += float(res_slq.trace_estimates(lambda t: t.abs()).mean())
    abs_log_sum += float(res_slq.trace_estimates(_abs_log_abs).mean())
    erank = math.exp(math.log(abs_sum) - abs_log_sum / abs_sum) if abs_sum > 0 else 0.0
    erank = min(max(erank, 1.0 if abs_sum > 0 else 0.0), float(n))
    ritz_sorted = ritz[torch.argsort(ritz.abs(), descending=True)]
    return _DeflatedSLQ(
        count=exact + count,
        error_estimate=2.0 * math.hypot(standard_error, quad),
        standard_error=standard_error,
        quadrature_error=quad,
        top=top,
        threshold=threshold,
        ritz_values=ritz_sorted,
        effective_rank=erank,
        num_matvecs=A.num_matvecs - start_count,
        num_deflated=int(conv.sum()),
    )


def _slq_count(res: SLQResult, threshold: float, rule: str) -> tuple[float, float, float]:
    """``(count, standard_error, quadrature_error)`` of the SLQ part by ``rule``."""
    if rule == "depth":
        return _depth_averaged_count(res, threshold)
    if rule == "step":
        c = count_from_slq(res, threshold)
        return c.estimate, c.standard_error, 0.0
    if rule == "radau":
        counts, half = radau_count(res, threshold)
        p = counts.numel()
        se = float(counts.std(unbiased=True) / math.sqrt(p)) if p > 1 else 0.0
        return float(counts.mean()), se, float(half.mean()) / 2
    raise ValueError(f"rule must be 'depth', 'step' or 'radau', got {rule!r}.")


def _depth_averaged_count(res: SLQResult, threshold: float) -> tuple[float, float, float]:
    """Gauss-rule count of ``|lambda| > threshold`` averaged over Lanczos depths.

    A Gauss node whose mass straddles the threshold moves a whole node weight across it as it
    drifts with the depth, so the count at a single depth jumps erratically. The tridiagonals
    of a ``m``-step run contain the rules of every depth ``<= m`` for free; averaging the
    counts of depths ``ceil(2m/3) .. m`` smooths those jumps (on the benchmark MLP this halved
    the mean error of the single-depth rule and removed its 10% outliers).

    Returns:
        ``(count, standard_error, quadrature_spread)``: the average; the standard error over
        probes, at least the Rademacher bound ``sqrt(2 c (1 - c / n) / p)`` for a count ``c``
        of a projector (the sample standard deviation of 2-5 probes is itself too noisy to
        trust); and the standard deviation of the count across the depths (the size of the
        jumps the averaging smooths: a heuristic scale of the remaining quadrature error,
        whose coverage ``benchmarks/hessian_eps_rank.py`` measures).
    """
    m = int(res.nodes.shape[1])
    depths = sorted({round(d) for d in torch.linspace(math.ceil(2 * m / 3), m, 11).tolist()})
    per_depth = torch.stack([
        count_from_slq(res if d == m else res.truncated(d), threshold).per_probe for d in depths
    ])  # (depths, probes)
    per_probe = per_depth.mean(dim=0)
    p = per_probe.numel()
    count = float(per_probe.mean())
    se = float(per_probe.std(unbiased=True) / math.sqrt(p)) if p > 1 else 0.0
    c = min(max(count, 0.0), float(res.n))
    se = max(se, math.sqrt(2 * c * (1 - c / res.n) / p))
    spread = float(per_depth.mean(dim=1).std(unbiased=True)) if len(depths) > 1 else 0.0
    return count, se, spread


#: Hessian-vector products the Lanczos eps-rank estimate uses by default (deflation and SLQ
#: together); ``benchmarks/hessian_eps_rank.py`` measures its accuracy.
DEFAULT_EPS_RANK_MATVECS = 1000
#: The smallest budget the estimator accepts. Below it the deflation run has not separated the
#: mass at 0 from the threshold and the count is biased upwards, by more than its error bar:
#: on a 1,482-parameter MLP +140% at 60 products, +60% at 150, within 5% from 300 on.
MIN_EPS_RANK_MATVECS = 300


def eps_rank_schedule(num_matvecs: int, n: int) -> tuple[int, int, int]:
    """How the Lanczos eps-rank estimate spends ``num_matvecs`` products on an ``n``-dim
    Hessian: ``(deflation steps, probes, steps per probe)``.

    A fifth goes to the deflation Lanczos run (at least 20 steps): it fixes the top eigenvalue,
    and hence the threshold, and removes the outliers, which narrows the spectrum the
    quadrature has to resolve. The rest goes to 2 probes (4 from 4,000 products): the
    resolution of a Gauss rule at the threshold is about (spectral width) / (steps), and
    network spectra have a continuum through the threshold, so long runs matter more than
    the Monte Carlo error. On the 13k-parameter spectra of ``benchmarks/hessian_eps_rank.py``
    (eps 1e-3, ReLU MLP at init) 2 probes of 450 steps erred by 1.3% on average, 4 of 225 by
    9.4%, at the same 1,000 products; over all eight spectrum/eps cases a 200-step deflation
    with 2 x 400 steps erred by 1.8% on average (100 + 2 x 450: 1.9%).

    Example::

        >>> from lightning_plasticity.measures.hessian_spectrum import eps_rank_schedule
        >>> eps_rank_schedule(1000, 13_098)
        (200, 2, 400)
        >>> eps_rank_schedule(300, 13_098)  # the smallest budget
        (60, 2, 120)
    """
    budget = max(int(num_matvecs), MIN_EPS_RANK_MATVECS)
    lanczos_steps = min(n, max(20, budget // 5))
    rest = budget - lanczos_steps
    probes = 4 if budget >= 4000 else 2
    return lanczos_steps, probes, max(10, min(n, rest // probes))


_EIGVALSH_SECONDS_PER_CUBE: list[float] = []


def _eigvalsh_seconds(n: int) -> float:
    """Predicted seconds of a float64 ``eigvalsh`` of order ``n`` on this machine, from one
    timed 640 x 640 solve (about 0.1 s once per process; ``O(n^3)``, which overestimates
    large ``n`` about 2x on a CPU)."""
    if not _EIGVALSH_SECONDS_PER_CUBE:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(640, 640, generator=g, dtype=_F64)
        a = a + a.T
        torch.linalg.eigvalsh(a[:16, :16])  # load LAPACK
        start = time.perf_counter()
        torch.linalg.eigvalsh(a)
        _EIGVALSH_SECONDS_PER_CUBE.append((time.perf_counter() - start) / 640**3)
    return _EIGVALSH_SECONDS_PER_CUBE[0] * n**3


def _seconds_per_product(hvp: HessianVectorProduct) -> float:
    """Seconds of one Hessian-vector product (the second of two, after warm-up)."""
    v = torch.ones(hvp.num_params, dtype=hvp.dtype, device=hvp.device)
    hvp @ v
    if hvp.device.type == "cuda":
        torch.cuda.synchronize(hvp.device)
    start = time.perf_counter()
    hvp @ v
    if hvp.device.type == "cuda":
        torch.cuda.synchronize(hvp.device)
    return max(time.perf_counter() - start, 1e-7)


def hessian_eps_rank(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    eps: float = 1e-3,
    relative: bool = True,
    method: Literal["auto", "dense", "lanczos"] = "auto",
    *,
    params: NamedParams | None = None,
    reduce: Reduce | None = None,
    max_dense_params: int | None = DEFAULT_MAX_DENSE_PARAMS,
    max_dense_memory_bytes: int | None = DEFAULT_MAX_DENSE_MEMORY_BYTES,
    num_matvecs: int = DEFAULT_EPS_RANK_MATVECS,
    max_seconds: float | None = None,
    num_lanczos_iter: int | None = None,
    num_probes: int | None = None,
    num_slq_iter: int | None = None,
    slq_reorthogonalize: bool = False,
    tol: float | None = None,
    seed: int = 0,
) -> EpsRank:
    """The eps-rank of the Hessian: the number of eigenvalues with ``|lambda| > threshold``.

    ``threshold = eps * |lambda_max|`` (largest magnitude) with ``relative=True`` (default),
    else ``threshold = eps``. Lewandowski et al. ("Directions of curvature as an explanation
    for loss of plasticity", 2023/24) track this count of curvature directions at task starts
    (over a block of the last layers, the "partial blockwise Hessian"; the literature differs,
    so ``params`` selects any block and the default is the whole model); its fall, normalised
    by the parameter count (``normalized_rank``, the "tau-trainability" normalisation), signals
    loss of plasticity.

    Defaults and why: ``relative=True`` because the loss scale and the sharpness change by
    orders of magnitude during training, and a scale-free threshold keeps the count comparable
    across time. ``eps=1e-3``: with a stable step size ``lr ~ 1/|lambda_max|`` a direction of
    curvature ``lambda`` contracts by a factor ``1 - lr * lambda`` per step, so directions
    below ``1e-3 |lambda_max|`` need more than ~1000 steps to be learned, i.e. they are flat on
    the time scale of a task. Network Hessians have a continuum of eigenvalues through any
    such threshold (on a 13k-parameter tanh MLP at init: 3,346 above 1e-3, 3,946 above 5e-4,
    6,407 above 1e-4 of the top one), so the count depends on ``eps`` itself and no method
    that sees the spectrum through a polynomial of modest degree resolves it exactly.

    Methods:
        ``"dense"``: the full Hessian by ``num_params`` Hessian-vector products, then
        ``torch.linalg.eigvalsh`` in float64: exact, ``O(n^3)`` time and ``16 n^2`` bytes;
        refused above ``max_dense_params`` or ``max_dense_memory_bytes``.

        ``"lanczos"``: deflated stochastic Lanczos quadrature in ``num_matvecs`` products
        (split by :func:`eps_rank_schedule`). Lanczos with full reorthogonalisation finds the
        top eigenvalues; the converged ones above the threshold are counted exactly and
        deflated (a :class:`~lightning_plasticity.measures.linear_operator.ProjectedOperator`);
        the rest is counted by SLQ (Ubaru, Chen & Saad 2017) on the deflated operator, with
        the Gauss-rule count averaged over the last third of the Lanczos depths. Where the
        bias of a single Gauss rule comes from: a node carrying the weight of many eigenvalues
        near the threshold jumps across it as the depth grows, so single-depth counts swing by
        10-20% on network spectra (``benchmarks/hessian_eps_rank.py``); averaging over depths
        cancels most of it. Gauss-Radau brackets (:func:`~lightning_plasticity.measures.
        lanczos.radau_count`) show why no rule can do much better at ``eps=1e-3``: the
        moments leave a third of the count undetermined, the mass of the continuum at 0.
        ``error_estimate`` is twice the combination of the probes' standard error and the
        spread over depths: a ~95% error bar (``benchmarks/hessian_eps_rank.py`` measures its
        coverage).

        ``"auto"``: the cost model. Dense costs ``n`` products plus an ``eigvalsh`` (timed
        once on this machine and scaled as ``n^3``), the estimate ``num_matvecs`` products
        (each timed); dense, within the limits above, whenever it costs at most twice the
        full estimate (an exact count is worth that) or fits ``max_seconds``.

    Args:
        model: The model (not modified).
        loss_fn: ``loss_fn(model, batch)`` returns the scalar mean loss.
        batch: The probe batch.
        eps: Threshold, relative to ``|lambda_max|`` or absolute (``> 0``).
        relative: Whether ``eps`` is relative to the largest-magnitude eigenvalue.
        method: ``"auto"``, ``"dense"`` or ``"lanczos"``.
        params: Parameter block from :func:`select_parameters`; default all trainable.
        reduce: Cross-rank average for DDP (see :class:`HessianVectorProduct`).
        max_dense_params: Largest parameter count for the dense method (``None``: no limit).
        max_dense_memory_bytes: Largest memory for the dense method (``None``: no limit).
        num_matvecs: Hessian-vector products of the Lanczos estimate (at least 300).
        max_seconds: Time limit: the product count shrinks to what fits (timed on the first
            products; never below 300, see ``MIN_EPS_RANK_MATVECS``), and ``"auto"`` also
            picks dense when it fits.
        num_lanczos_iter: Override the deflation steps of :func:`eps_rank_schedule`.
        num_probes: Override its number of SLQ probes.
        num_slq_iter: Override its Lanczos steps per probe.
        slq_reorthogonalize: Fully reorthogonalise each SLQ probe's Lanczos basis. Without it
            only the three-term recurrence runs (``O(n)`` memory per probe); the Gauss
            quadrature stays accurate (Knizhnerman 1996; Chen, Trogdon & Ubaru 2021).
        tol: Relative residual tolerance for a Ritz pair to count as converged (default
            ``sqrt(eps)`` of the parameter dtype); it must also be below ``threshold / 10``.
        seed: Seed of all random vectors.

    Returns:
        An :class:`EpsRank`.

    Raises:
        ValueError: On a bad argument, or ``method="dense"`` beyond the limits (the message
            names the parameter count and the limit).

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.measures import hessian_eps_rank, select_parameters
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])
        >>> r = hessian_eps_rank(model, loss_fn, (x, y))  # relative eps=1e-3, auto method
        >>> r.method, r.num_params, r.eps_rank, round(r.normalized_rank, 3), r.error_estimate
        ('dense', 26, 19.0, 0.731, 0.0)
        >>> head = select_parameters(model, last_n_layers=1)
        >>> r = hessian_eps_rank(model, loss_fn, (x, y), params=head, method="dense")
        >>> r.num_params, r.eps_rank
        (10, 4.0)
    """
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps}.")
    if method not in ("auto", "dense", "lanczos"):
        raise ValueError(f"method must be 'auto', 'dense' or 'lanczos', got {method!r}.")
    for name, value in (
        ("num_matvecs", num_matvecs),
        ("num_lanczos_iter", num_lanczos_iter),
        ("num_probes", num_probes),
        ("num_slq_iter", num_slq_iter),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0 or None, got {max_seconds}.")

    with HessianVectorProduct(model, loss_fn, batch, params, reduce) as hvp:
        n = hvp.num_params
        budget = num_matvecs
        if method != "dense" and (max_seconds is not None or method == "auto"):
            per_product = _seconds_per_product(hvp)
            if reduce is not None:  # every rank must choose the same method and budget
                per_product = float(reduce(torch.tensor(per_product, dtype=_F64,
                                                        device=hvp.device)))
            if max_seconds is not None:
                # Each product also pays the Lanczos vector work (reorthogonalisation against
                # the deflation basis, projections): about as much again on CPU-sized models.
                budget = max(MIN_EPS_RANK_MATVECS,
                             min(budget, int(max_seconds / (2 * per_product))))
            if method == "auto":
                method = "lanczos"
                try:
                    hvp.check_dense(max_dense_params, max_dense_memory_bytes,
                                    _dense_eig_extra_bytes(hvp))
                    eig_seconds = _eigvalsh_seconds(n)
                    if reduce is not None:
                        eig_seconds = float(reduce(torch.tensor(eig_seconds, dtype=_F64,
                                                                device=hvp.device)))
                    dense_seconds = n * per_product + eig_seconds
                    # Exact whenever it costs at most twice a full-budget estimate (even if
                    # the time limit cut the estimate's budget) or fits the time limit.
                    if dense_seconds <= max(2 * num_matvecs * per_product, 1e-3) or (
                            max_seconds is not None and dense_seconds <= max_seconds):
                        method = "dense"
                except ValueError:
                    pass
        if method == "dense":
            return _eps_rank_dense(hvp, eps, relative, max_dense_params, max_dense_memory_bytes)
        steps, probes, depth = eps_rank_schedule(budget, n)
        est = _deflated_slq_count(
            hvp, eps, relative,
            num_lanczos_iter if num_lanczos_iter is not None else steps,
            num_probes if num_probes is not None else probes,
            num_slq_iter if num_slq_iter is not None else depth,
            seed, tol, reorthogonalize=slq_reorthogonalize, rule="depth",
        )
        rank = min(max(est.count, 0.0), float(n))
        return EpsRank(
            eps_rank=rank,
            normalized_rank=rank / n,
            effective_rank=est.effective_rank,
            num_params=n,
            top_eigenvalue=est.top,
            threshold=float(est.threshold),
            error_estimate=est.error_estimate,
            method="lanczos",
            eigenvalues=est.ritz_values,
            eps=eps,
            relative=relative,
            loss=float(hvp.loss),
            num_matvecs=est.num_matvecs,
            num_deflated=est.num_deflated,
        )


# ----------------------------------------------------------------------------- density
@dataclass(frozen=True)
class SpectralDensity:
    """Gaussian-smoothed Hessian eigenvalue density by SLQ.

    Attributes:
        grid: ``(g,)`` float64 eigenvalue grid.
        density: ``(g,)`` float64 density (fraction of eigenvalues per unit; integrates to 1).
        sigma: Kernel width used.
        nodes: ``(num_probes, num_iter)`` Ritz nodes per probe.
        weights: ``(num_probes, num_iter)`` Gauss weights per probe (rows sum to 1).
        num_params: Number of parameters the Hessian covers.
        num_matvecs: Hessian-vector products used.
    """

    grid: Tensor
    density: Tensor
    sigma: float
    nodes: Tensor
    weights: Tensor
    num_params: int
    num_matvecs: int


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    num_probes: int = 10,
    num_iter: int = 80,
    grid: Tensor | int = 1000,
    sigma: float | None = None,
    *,
    params: NamedParams | None = None,
    reduce: Reduce | None = None,
    seed: int = 0,
) -> SpectralDensity:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019).

    Args:
        model: The model (not modified).
        loss_fn: ``loss_fn(model, batch)`` returns the scalar mean loss.
        batch: The probe batch.
        num_probes: Rademacher probes.
        num_iter: Lanczos steps per probe.
        grid: Evaluation points, or their number (over the Ritz range +- 5 sigma).
        sigma: Gaussian kernel width (default 1% of the Ritz range).
        params: Parameter block from :func:`select_parameters`; default all trainable.
        reduce: Cross-rank average for DDP (see :class:`HessianVectorProduct`).
        seed: Seed of the probes.

    Returns:
        A :class:`SpectralDensity`.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.measures import spectral_density
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])
        >>> d = spectral_density(model, loss_fn, (x, y), num_probes=4, num_iter=60)
        >>> d.grid.shape, d.density.shape
        (torch.Size([1000]), torch.Size([1000]))
        >>> round(float(torch.trapezoid(d.density, d.grid)), 3)  # a probability density
        1.0
        >>> # to plot it: plt.semilogy(d.grid, d.density)
    """
    with HessianVectorProduct(model, loss_fn, batch, params, reduce) as hvp:
        res = slq(hvp, num_probes, num_iter, seed)
    grid_t, sigma_f = _grid_and_sigma(res, grid, sigma)
    return SpectralDensity(
        grid=grid_t,
        density=res.density(grid_t, sigma_f),
        sigma=sigma_f,
        nodes=res.nodes,
        weights=res.weights,
        num_params=res.n,
        num_matvecs=res.num_matvecs,
    )
