"""Lanczos eigensolver and stochastic Lanczos quadrature over a matrix-vector product.

Everything here works on a symmetric :class:`~lightning_plasticity.measures.linear_operator.
LinearOperator` ``A`` (``A @ x`` for vectors and blocks; the Hessian is one:
:class:`~lightning_plasticity.measures.hvp.HessianVectorProduct`; a dense tensor is accepted
too). The Lanczos
vectors, the tridiagonal matrix and all reductions are kept in float64 whatever the matvec
dtype, with *full reorthogonalisation* (classical Gram-Schmidt, applied twice), so there are no
spurious "ghost" Ritz values and the Ritz residual estimates are reliable. Memory is
``n * num_iter`` float64 numbers for the Lanczos basis.

Random vectors come from a CPU ``torch.Generator`` seeded by ``seed`` and are then moved to the
device, so every DDP rank (and every device type) draws the same vectors, and the global RNG is
never consumed.

Accuracy of stochastic Lanczos quadrature (SLQ). For ``tr f(H) = sum_i f(lambda_i)`` SLQ
averages ``num_probes`` Rademacher quadratic forms ``z^T f(H) z``, each evaluated by
``num_iter``-point Gauss quadrature from Lanczos. Ubaru, Chen & Saad (2017, "Fast estimation of
tr(f(A)) via stochastic Lanczos quadrature") bound the error for analytic ``f``: the number of
probes needed for relative error ``eps`` with probability ``1 - eta`` grows like
``eps^-2 log(1/eta)``, and the Lanczos steps like ``sqrt(kappa) log(1/eps)``. Eigenvalue
*counts* use a step function, which is not analytic: the Gauss rule then has an error of the
order of the weight of the Ritz node nearest the threshold, i.e. it is accurate when few
eigenvalues lie close to the threshold relative to the node spacing (``~ spectral width /
num_iter``). The Rademacher variance of a count ``r`` is at most ``2 r`` per probe. In our tests
(``tests/measures/test_lanczos.py``) densities integrate to 1 to 1e-6 and their means match
``tr(H)/n`` within the probe noise; counts on a 10k-parameter MLP Hessian are within a few
percent of the dense count when deflated (see :func:`~lightning_plasticity.measures.
hessian_spectrum.hessian_eps_rank`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_plasticity.measures.linear_operator import (
    LinearOperator,
    ProjectedOperator,
    as_operator,
)

__all__ = [
    "EigenResult",
    "SLQCount",
    "SLQResult",
    "lanczos",
    "slq",
    "slq_count_above",
    "slq_density",
    "top_eigenpairs",
]

Which = Literal["LA", "SA", "LM"]

_F64 = torch.float64


def _default_tol(dtype: torch.dtype) -> float:
    # The attainable relative residual is ~ the matvec's rounding error; sqrt(eps) leaves room.
    return math.sqrt(torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-8


def _basis_dtype(dtype: torch.dtype) -> torch.dtype:
    """Lanczos vectors are stored in float64 for float64 operators and in float32 otherwise:
    the products of a float32 operator carry float32 rounding anyway, and the basis is the
    memory and bandwidth bottleneck."""
    return _F64 if dtype == _F64 else torch.float32


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def _rademacher(n: int, generator: torch.Generator, device: torch.device | str) -> Tensor:
    z = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8).to(_F64)
    return (2 * z - 1).to(device)


def _orthogonalise(w: Tensor, Q: Tensor) -> Tensor:
    """Project ``Q``'s column space out of ``w`` by classical Gram-Schmidt, with a second pass
    only when the first removed most of ``w`` (the Daniel-Gragg-Kaufman-Stewart criterion), so
    the basis stays orthogonal to working precision at the cost of about one pass."""
    if Q.shape[1] == 0:
        return w
    before = w.norm()
    w = w - Q @ (Q.T @ w)
    if w.norm() < 0.5 * before:
        w = w - Q @ (Q.T @ w)
    return w


class _LanczosProcess:
    """A Lanczos run that can be extended step by step (full reorthogonalisation).

    After ``m`` steps ``H Q_m = Q_m T_m + beta_m q_{m+1} e_m^T`` with ``T_m`` tridiagonal
    (``alphas`` on the diagonal, ``betas[:m-1]`` off it). On an invariant subspace
    (``beta ~ 0``) the process restarts with a fresh random vector orthogonal to the basis and a
    zero off-diagonal, so repeated eigenvalues are found too.
    """

    def __init__(
        self,
        A: LinearOperator,
        generator: torch.Generator,
        start: Tensor | None = None,
        capacity: int = 64,
    ) -> None:
        self.A, self.n, self.generator = A, A.n, generator
        n = A.n
        self.dtype, self.device = A.dtype, A.device
        self.bdt = _basis_dtype(self.dtype)
        self.Q = torch.empty(n, min(capacity, n), dtype=self.bdt, device=self.device)
        self.alphas: list[float] = []
        self.betas: list[float] = []  # betas[j] couples q_j and q_{j+1}
        self.scale = 0.0  # running max |alpha|, |beta|: the breakdown test is relative to it
        if start is None:
            q = torch.randn(n, generator=generator, dtype=_F64).to(self.device, self.bdt)
        else:
            if start.shape != (n,):
                raise ValueError(f"start must have shape ({n},), got {tuple(start.shape)}.")
            q = start.detach().to(dtype=self.bdt, device=self.device)
        norm = float(q.norm())
        if not math.isfinite(norm) or norm == 0.0:
            raise ValueError("the Lanczos start vector must be finite and non-zero.")
        self.q = q / norm
        self.m = 0
        self.num_matvecs = 0

    @property
    def basis(self) -> Tensor:
        return self.Q[:, : self.m]

    @property
    def residual_beta(self) -> float:
        """``beta_m`` of the last step (0 after a breakdown or a full basis)."""
        return self.betas[-1] if self.betas else 0.0

    def _fresh_direction(self) -> Tensor | None:
        for _ in range(3):
            r = torch.randn(self.n, generator=self.generator, dtype=_F64).to(self.device,
                                                                              self.bdt)
            r = _orthogonalise(r, self.basis)
            norm = float(r.norm())
            if norm > 1e-8:
                return r / norm
        return None

    def extend(self, steps: int, restart: bool = True) -> None:
        """Run up to ``steps`` more Lanczos steps (fewer if the basis reaches ``n``).

        Args:
            steps: Number of steps.
            restart: On an invariant subspace, continue from a fresh random direction
                (eigen-solvers); otherwise stop there (quadrature, where later nodes would
                have zero weight).
        """
        target = min(self.n, self.m + steps)
        if target > self.Q.shape[1]:
            grown = torch.empty(
                self.n, min(self.n, max(target, 2 * self.Q.shape[1])), dtype=self.bdt,
                device=self.device,
            )
            grown[:, : self.m] = self.basis
            self.Q = grown
        while self.m < target:
            if self.m > 0 and self.betas[-1] == 0.0:
                # The previous step found an invariant subspace.
                fresh = self._fresh_direction() if restart else None
                if fresh is None:
                    return
                self.q = fresh
            j = self.m
            self.Q[:, j] = self.q
            w = (self.A @ self.q.to(self.dtype)).to(device=self.device, dtype=self.bdt)
            self.num_matvecs += 1
            alpha = float(self.q @ w)
            if not math.isfinite(alpha):
                raise FloatingPointError(
                    "the operator returned a non-finite product during Lanczos iteration."
                )
            self.m = j + 1
            # Three-term recurrence first, so that the full reorthogonalisation only removes
            # rounding errors and rarely needs its second pass.
            w = w - alpha * self.q
            if j > 0 and self.betas[-1] != 0.0:
                w = w - self.betas[-1] * self.Q[:, j - 1]
            w = _orthogonalise(w, self.basis)
            beta = float(w.norm())
            self.alphas.append(alpha)
            self.scale = max(self.scale, abs(alpha), beta)
            if self.m >= self.n or beta <= 1e-12 * max(self.scale, 1e-300):
                self.betas.append(0.0)
            else:
                self.betas.append(beta)
                self.q = w / beta

    def extend_until_breakdown(self, steps: int) -> None:
        self.extend(steps, restart=False)

    def tridiagonal(self) -> Tensor:
        m = self.m
        T = torch.diag(torch.tensor(self.alphas[:m], dtype=_F64))
        if m > 1:
            off = torch.tensor(self.betas[: m - 1], dtype=_F64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        return T

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (ascending), eigenvectors of ``T`` (columns), residual estimates.

        The residual of Ritz pair ``i`` is exactly ``|beta_m S[m-1, i]|`` in exact arithmetic,
        and stays accurate with full reorthogonalisation.
        """
        theta, S = torch.linalg.eigh(self.tridiagonal())
        res = (self.residual_beta * S[-1, :]).abs()
        return theta, S, res


def lanczos(
    A: LinearOperator | Tensor,
    num_iter: int,
    generator: torch.Generator | None = None,
    start: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``num_iter`` Lanczos steps with full reorthogonalisation.

    Args:
        A: Symmetric operator (or dense symmetric matrix) of dimension ``n``.
        num_iter: Number of steps (capped at ``n``).
        generator: CPU generator for the start vector and restarts (default: seeded with 0).
        start: Optional start vector (normalised internally).

    Returns:
        ``(alphas, betas, Q)``: the diagonal ``(m,)`` and off-diagonal ``(m-1,)`` of the
        tridiagonal ``T = Q^T H Q`` and the orthonormal basis ``Q`` ``(n, m)``, all float64,
        with ``m = min(num_iter, n)``. A zero in ``betas`` marks a restart after an invariant
        subspace was found.

    Example::

        >>> import torch
        >>> from lightning_plasticity.measures.lanczos import lanczos
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> alphas, betas, Q = lanczos(A, 30)
        >>> alphas.shape, betas.shape, Q.shape
        (torch.Size([30]), torch.Size([29]), torch.Size([100, 30]))
        >>> T = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
        >>> round(float(torch.linalg.eigvalsh(T)[-1]), 2)  # ~ 100
        100.0
    """
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1, got {num_iter}.")
    A = as_operator(A)
    proc = _LanczosProcess(
        A, generator if generator is not None else _generator(0), start,
        capacity=min(num_iter, A.n),
    )
    proc.extend(num_iter)
    m = proc.m
    return (
        torch.tensor(proc.alphas[:m], dtype=_F64),
        torch.tensor(proc.betas[: m - 1], dtype=_F64),
        proc.basis.clone(),
    )


@dataclass(frozen=True)
class EigenResult:
    """Extreme eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(k,)`` float64, ordered as requested (``"LA"``: descending, ``"SA"``:
            ascending, ``"LM"``: descending magnitude).
        eigenvectors: ``(n, k)`` orthonormal columns in the operator's dtype.
        residuals: ``(k,)`` float64 ``||H v - lambda v||`` for each pair (unit ``v``).
        converged: ``(k,)`` bool, ``residual <= tol * max |eigenvalue|``.
        num_matvecs: Operator applications used (including residual checks).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    num_matvecs: int


def _select(theta: Tensor, k: int, which: Which) -> Tensor:
    if which == "LA":
        return torch.argsort(theta, descending=True)[:k]
    if which == "SA":
        return torch.argsort(theta)[:k]
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True)[:k]
    raise ValueError(f"which must be 'LA', 'SA' or 'LM', got {which!r}.")


def top_eigenpairs(
    A: LinearOperator | Tensor,
    k: int,
    which: Which = "LA",
    tol: float | None = None,
    max_iter: int | None = None,
    seed: int = 0,
    backend: Literal["torch", "scipy"] = "torch",
    exact_residuals: bool = True,
    warn: bool = True,
) -> EigenResult:
    """``k`` extreme eigenpairs of a symmetric operator by Lanczos.

    The Krylov basis is grown (full reorthogonalisation) until the ``k`` wanted Ritz pairs have
    residual ``<= tol * max|theta|`` or ``max_iter`` steps are reached, so no restart logic is
    needed; unconverged pairs are returned with ``converged=False`` and, with ``warn``, a
    warning (once per call site) says how many and how to get them.

    Args:
        A: Symmetric operator (or dense symmetric matrix) of dimension ``n``.
        k: Number of eigenpairs (``1 <= k <= n``).
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic (most negative),
            ``"LM"`` largest magnitude.
        tol: Relative residual tolerance; default ``sqrt(machine eps)`` of ``dtype`` (1.5e-8
            for float64, 3.5e-4 for float32): about the attainable accuracy of the products.
        max_iter: Largest Krylov dimension; default ``min(n, max(300, 10 k))`` (interior
            ends of a Hessian spectrum, e.g. ``which="SA"``, converge slowly).
        seed: Seed of the start vector.
        backend: ``"torch"`` (this module's Lanczos) or ``"scipy"`` (ARPACK ``eigsh`` over
            :meth:`LinearOperator.to_scipy`, on CPU float64 vectors).
        exact_residuals: Recompute ``||H v - lambda v||`` with ``k`` extra products instead of
            the Lanczos estimate.
        warn: Warn when some of the ``k`` pairs did not converge.

    Returns:
        An :class:`EigenResult`.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.measures import HessianVectorProduct
        >>> from lightning_plasticity.measures.lanczos import top_eigenpairs
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
        >>> hvp = HessianVectorProduct(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))
        >>> res = top_eigenpairs(hvp, k=5)
        >>> res.eigenvalues.shape, res.eigenvectors.shape
        (torch.Size([5]), torch.Size([26, 5]))
        >>> bool(res.converged.all())
        True
        >>> exact = torch.linalg.eigvalsh(hvp.dense()).flip(0)  # descending
        >>> torch.allclose(res.eigenvalues[0], exact[0])  # largest Hessian eigenvalue
        True
    """
    A = as_operator(A)
    n, dtype = A.n, A.dtype
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and n={n}, got {k}.")
    _select(torch.zeros(1), 1, which)  # validate `which`
    tol = _default_tol(dtype) if tol is None else float(tol)
    max_iter = min(n, max(300, 10 * k)) if max_iter is None else min(n, max(int(max_iter), k))
    generator = _generator(seed)
    start_count = A.num_matvecs

    if backend == "scipy":
        vals, vecs = _scipy_eigsh(A, k, which, tol, max_iter, generator)
    elif backend == "torch":
        proc = _LanczosProcess(A, generator, capacity=max_iter)
        step = min(max_iter, max(2 * k + 20, 30))
        while True:
            before = proc.m
            proc.extend(step)
            theta, S, res = proc.ritz()
            idx = _select(theta, k, which)
            scale = float(theta.abs().max())
            done = len(idx) == k and bool((res[idx] <= tol * max(scale, 1e-300)).all())
            if done or proc.m >= max_iter or proc.m == before:
                break
            step = min(max(10, proc.m // 4), max_iter - proc.m)
        vals = theta[idx]
        vecs = proc.basis @ S[:, idx].to(proc.device, proc.bdt)
        est_res = res[idx]
    else:
        raise ValueError(f"backend must be 'torch' or 'scipy', got {backend!r}.")

    if exact_residuals or backend == "scipy":
        residuals = torch.empty(len(vals), dtype=_F64)
        for i in range(len(vals)):
            v = vecs[:, i]
            hv = (A @ v.to(dtype)).to(device=v.device, dtype=_F64)
            residuals[i] = float((hv - vals[i] * v).norm())
    else:
        residuals = est_res
    scale = float(vals.abs().max()) if len(vals) else 0.0
    converged = residuals <= tol * max(scale, 1e-300)
    if warn and not bool(converged.all()):
        warnings.warn(
            f"Lanczos: {int((~converged).sum())} of {k} eigenpairs ({which}) did not reach the "
            f"relative residual tol={tol:.1e} in {max_iter} steps; they are flagged in "
            "`converged`. Raise max_iter (or tol) to converge them.", stacklevel=2)
    return EigenResult(
        eigenvalues=vals.to(_F64).cpu(),
        eigenvectors=vecs.to(dtype),
        residuals=residuals,
        converged=converged,
        num_matvecs=A.num_matvecs - start_count,
    )


def _scipy_eigsh(
    A: LinearOperator,
    k: int,
    which: Which,
    tol: float,
    max_iter: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    from scipy.sparse.linalg import eigsh

    n = A.n
    op = A.to_scipy()
    v0 = torch.randn(n, generator=generator, dtype=_F64).numpy()
    if k >= n - 1:
        raise ValueError(f"backend='scipy' needs k < n - 1 (ARPACK), got k={k}, n={n}.")
    ncv = min(n, max(2 * k + 1, 20))
    vals, vecs = eigsh(op, k=k, which=which, tol=tol, maxiter=max(max_iter, 10 * n), v0=v0,
                       ncv=ncv)
    t_vals = torch.from_numpy(vals)
    t_vecs = torch.from_numpy(vecs)
    order = _select(t_vals, k, which)
    return t_vals[order], t_vecs[:, order].to(A.device)


@dataclass(frozen=True)
class SLQResult:
    """Stochastic Lanczos quadrature of a symmetric operator's spectrum.

    The spectral measure ``(1/n) sum_i delta(t - lambda_i)`` is approximated by the average over
    probes of ``sum_j weights[p, j] delta(t - nodes[p, j])``.

    Attributes:
        nodes: ``(num_probes, num_iter)`` float64 Ritz values (Gauss nodes) per probe.
        weights: ``(num_probes, num_iter)`` float64 Gauss weights per probe; each row sums to 1
            (rows of a Lanczos run that stopped early are zero-padded).
        n: Dimension of the operator.
        num_matvecs: Operator applications used.
        tridiagonals: Per probe, the Lanczos tridiagonal matrix (empty for a probe with no
            component in the projected space).
        residual_betas: ``(num_probes,)`` the off-diagonal coefficient that would follow each
            tridiagonal (0 after an invariant subspace).
        scales: ``(num_probes,)`` probe weights ``||P z||^2 / n`` (1 without projection).
    """

    nodes: Tensor
    weights: Tensor
    n: int
    num_matvecs: int
    tridiagonals: tuple[Tensor, ...] = ()
    residual_betas: Tensor | None = None
    scales: Tensor | None = None

    @property
    def num_probes(self) -> int:
        return int(self.nodes.shape[0])

    def truncated(self, num_iter: int) -> SLQResult:
        """The quadrature after only the first ``num_iter`` Lanczos steps of each probe (no new
        products: the leading block of each tridiagonal). Comparing it with the full result
        shows how far the quadrature has converged."""
        if not self.tridiagonals:
            raise ValueError("this SLQResult holds no tridiagonal matrices.")
        scales = self.scales if self.scales is not None else torch.ones(self.num_probes)
        betas = torch.tensor(
            [float(T[num_iter, num_iter - 1]) if T.shape[0] > num_iter else 0.0
             for T in self.tridiagonals], dtype=_F64,
        )
        if self.residual_betas is not None:
            # Runs not longer than num_iter keep their own residual coefficient.
            short = torch.tensor([T.shape[0] <= num_iter for T in self.tridiagonals])
            betas = torch.where(short, self.residual_betas, betas)
        return _quadrature(
            [T[:num_iter, :num_iter] for T in self.tridiagonals], betas, scales, self.n,
            min(num_iter, self.nodes.shape[1]), 0,
        )

    def trace_estimates(self, f: Callable[[Tensor], Tensor]) -> Tensor:
        """Per-probe estimates of ``tr f(H)``: ``n * sum_j w_j f(theta_j)``."""
        return self.n * (self.weights * f(self.nodes)).sum(dim=1)

    def density(self, grid: Tensor, sigma: float) -> Tensor:
        """Gaussian-smoothed spectral density on ``grid`` (integrates to ~1)."""
        diff = grid.to(_F64).reshape(-1, 1, 1) - self.nodes.unsqueeze(0)
        kern = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return (kern * self.weights.unsqueeze(0)).sum(dim=(1, 2)) / self.num_probes


def _multi_lanczos(
    A: LinearOperator,
    Z: Tensor,
    num_iter: int,
    reorthogonalize: bool = True,
) -> list[tuple[Tensor, float]]:
    """Independent Lanczos runs from the columns of ``Z``, in lockstep so that each step is
    one block product ``A @ Q``.

    With ``reorthogonalize`` every new vector is orthogonalised against its run's whole basis
    (``num_iter * n`` numbers per column); without, only the three-term recurrence is used
    (``O(n)`` memory per column), which loses orthogonality once Ritz values converge but
    keeps the Gauss quadrature accurate (Knizhnerman 1996; Chen, Trogdon & Ubaru 2021).

    Returns ``(T, beta)`` per column: the tridiagonal matrix and the next off-diagonal
    coefficient (0 after an invariant subspace). A run that finds an invariant subspace stops
    there: its Gauss rule is then exact and later nodes would carry zero weight.
    """
    n, p = Z.shape
    dtype, device = A.dtype, A.device
    m = min(num_iter, n)
    bdt = _basis_dtype(dtype)
    Z = Z.to(bdt)
    Q = torch.zeros(p, m, n, dtype=bdt, device=device) if reorthogonalize else None
    q = (Z / Z.norm(dim=0, keepdim=True)).T.contiguous()  # (p, n)
    q_prev = torch.zeros_like(q)
    alphas = torch.zeros(p, m, dtype=_F64)
    betas = torch.zeros(p, m, dtype=_F64)
    lengths = [m] * p
    active = torch.ones(p, dtype=torch.bool)
    scale = torch.zeros(p, dtype=_F64)
    prev_b = torch.zeros(p, dtype=bdt, device=device)
    j = 0
    for j in range(m):
        if Q is not None:
            Q[:, j] = q
        W = (A @ q.T.to(dtype).contiguous()).to(device=device, dtype=bdt).T.contiguous()
        a = (q * W).sum(dim=1)
        if not bool(torch.isfinite(a).all()):
            raise FloatingPointError(
                "the operator returned a non-finite product during Lanczos iteration."
            )
        alphas[:, j] = a.cpu()
        W = W - a.unsqueeze(1) * q - prev_b.unsqueeze(1) * q_prev  # three-term recurrence
        if Q is not None:
            # One full reorthogonalisation pass; a second one for the block if any column
            # lost most of its norm (the DGKS criterion).
            Qj = Q[:, : j + 1]
            before = W.norm(dim=1)
            W = W - torch.bmm(Qj.transpose(1, 2), torch.bmm(Qj, W.unsqueeze(2))).squeeze(2)
            if bool((W.norm(dim=1) < 0.5 * before).any()):
                W = W - torch.bmm(Qj.transpose(1, 2), torch.bmm(Qj, W.unsqueeze(2))).squeeze(2)
        b = W.norm(dim=1)
        b_cpu = b.cpu()
        scale = torch.maximum(scale, torch.maximum(a.abs().cpu(), b_cpu).to(_F64))
        betas[:, j] = b_cpu
        broke = active & (b_cpu <= 1e-12 * scale.clamp_min(1e-300))
        for i in torch.nonzero(broke).flatten().tolist():
            lengths[i] = j + 1
        active &= ~broke
        if j == m - 1 or not bool(active.any()):
            break
        alive = active.to(device)
        q_prev = q
        q = torch.where(alive.unsqueeze(1), W / b.clamp_min(1e-300).unsqueeze(1),
                        torch.zeros_like(W))
        prev_b = torch.where(alive, b, torch.zeros_like(b))
    out = []
    for i in range(p):
        k = lengths[i] if not bool(active[i]) else min(m, j + 1)
        T = torch.diag(alphas[i, :k])
        if k > 1:
            off = betas[i, : k - 1]
            T += torch.diag(off, 1) + torch.diag(off, -1)
        out.append((T, float(betas[i, k - 1]) if bool(active[i]) else 0.0))
    return out


def slq(
    A: LinearOperator | Tensor,
    num_probes: int = 10,
    num_iter: int = 80,
    seed: int = 0,
    block_size: int = 8,
    reorthogonalize: bool = True,
) -> SLQResult:
    """Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019).

    Each probe is a Rademacher vector ``z`` (``||z||^2 = n``); Lanczos from ``z/sqrt(n)`` gives
    ``T = S diag(theta) S^T`` and the Gauss rule ``z^T f(H) z ~ n sum_j S[0, j]^2
    f(theta_j)``, exact for polynomials of degree ``< 2 num_iter``. Up to ``block_size``
    probes run in lockstep, one block product ``A @ Z`` per step (batched Hessian-vector
    products are faster per vector than single ones).

    Args:
        A: Symmetric operator (or dense symmetric matrix) of dimension ``n``. For a
            :class:`~lightning_plasticity.measures.linear_operator.ProjectedOperator`
            ``P H P`` each probe is projected first and weighted by ``||P z||^2 / n``, so the
            estimate is of ``tr(P f(PHP) P)``.
        num_probes: Number of Rademacher probes.
        num_iter: Lanczos steps per probe (capped at ``n``).
        seed: Seed of the probes.
        block_size: Probes per block product. Memory is ``block_size * num_iter * n``
            numbers with reorthogonalisation, ``O(block_size * n)`` without.
        reorthogonalize: Full reorthogonalisation of each probe's Lanczos basis (default).
            Without it the quadrature stays accurate (Knizhnerman 1996; Chen, Trogdon & Ubaru
            2021, "Analysis of stochastic Lanczos quadrature for spectrum approximation"),
            the cost per step no longer grows with the step and memory is ``O(n)`` per probe,
            but converged Ritz values come with spurious copies that share their weight.

    Returns:
        An :class:`SLQResult`.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.measures import HessianVectorProduct
        >>> from lightning_plasticity.measures.lanczos import slq
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
        >>> hvp = HessianVectorProduct(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))
        >>> res = slq(hvp, num_probes=10, num_iter=10)
        >>> res.nodes.shape, res.weights.shape
        (torch.Size([10, 10]), torch.Size([10, 10]))
        >>> per_probe = res.trace_estimates(lambda t: t)
        >>> estimate = per_probe.mean()  # ~ trace of the Hessian
        >>> standard_error = per_probe.std() / per_probe.numel() ** 0.5
        >>> bool(abs(estimate - torch.trace(hvp.dense())) < 3 * standard_error)
        True
    """
    if num_probes < 1 or num_iter < 1:
        raise ValueError(
            f"num_probes and num_iter must be >= 1, got {num_probes} and {num_iter}."
        )
    A = as_operator(A)
    n = A.n
    m = min(num_iter, n)
    generator = _generator(seed)
    # All probes are drawn up front so that the result does not depend on block_size.
    probes = [_rademacher(n, generator, A.device) for _ in range(num_probes)]
    scales = [1.0] * num_probes
    if isinstance(A, ProjectedOperator):
        probes = [A.project(z) for z in probes]
        scales = [float(z @ z) / n for z in probes]
    keep = [i for i in range(num_probes) if scales[i] > 1e-30]
    runs: dict[int, tuple[Tensor, float]] = {}
    num_matvecs = 0
    for start in range(0, len(keep), max(1, block_size)):
        idx = keep[start : start + max(1, block_size)]
        Z = torch.stack([probes[i] for i in idx], dim=1)
        before = A.num_matvecs
        runs.update(zip(idx, _multi_lanczos(A, Z, m, reorthogonalize)))
        num_matvecs += A.num_matvecs - before
    empty = (torch.zeros(0, 0, dtype=_F64), 0.0)
    Ts = [runs.get(i, empty)[0] for i in range(num_probes)]
    betas = torch.tensor([runs.get(i, empty)[1] for i in range(num_probes)], dtype=_F64)
    return _quadrature(Ts, betas, torch.tensor(scales, dtype=_F64), n, m, num_matvecs)


def _quadrature(
    Ts: list[Tensor], betas: Tensor, scales: Tensor, n: int, m: int, num_matvecs: int
) -> SLQResult:
    """Gauss nodes and weights from Lanczos tridiagonals (Golub & Welsch)."""
    p = len(Ts)
    nodes = torch.zeros(p, m, dtype=_F64)
    weights = torch.zeros(p, m, dtype=_F64)
    for i, T in enumerate(Ts):
        if T.numel() == 0 or float(scales[i]) <= 1e-30:
            continue
        theta, S = torch.linalg.eigh(T)
        k = theta.numel()
        nodes[i, :k] = theta
        weights[i, :k] = scales[i] * S[0, :] ** 2
    return SLQResult(nodes=nodes, weights=weights, n=n, num_matvecs=num_matvecs,
                     tridiagonals=tuple(Ts), residual_betas=betas, scales=scales)


def slq_density(
    A: LinearOperator | Tensor,
    num_probes: int = 10,
    num_iter: int = 80,
    seed: int = 0,
    grid: Tensor | int = 1000,
    sigma: float | None = None,
) -> tuple[Tensor, Tensor, SLQResult]:
    """Gaussian-smoothed spectral density by SLQ (Ghorbani et al. 2019, Sec. 2).

    ``density(t) = (1/P) sum_p sum_j w_pj N(t; theta_pj, sigma^2)``, a probability density
    (it integrates to 1 over a grid covering the nodes +- a few sigma).

    Args:
        A: Symmetric operator (or dense symmetric matrix).
        num_probes: Number of probes.
        num_iter: Lanczos steps per probe.
        seed: Seed of the probes.
        grid: Points at which to evaluate the density, or their number (an even grid over
            ``[min node - 5 sigma, max node + 5 sigma]``).
        sigma: Kernel width; default 1% of the Ritz-value range (Ghorbani et al. use a
            variance of 1e-5 on a spectrum normalised to [-1, 1], i.e. a similar scale).

    Returns:
        ``(grid, density, slq_result)``, grid and density float64 on CPU.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.measures import HessianVectorProduct
        >>> from lightning_plasticity.measures.lanczos import slq_density
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
        >>> hvp = HessianVectorProduct(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))
        >>> grid, density, _ = slq_density(hvp, num_probes=4, num_iter=20)
        >>> grid.shape, density.shape
        (torch.Size([1000]), torch.Size([1000]))
        >>> round(float(torch.trapezoid(density, grid)), 3)  # ~ 1
        1.0
    """
    res = slq(A, num_probes, num_iter, seed)
    grid_t, sigma = _grid_and_sigma(res, grid, sigma)
    return grid_t, res.density(grid_t, sigma), res


def _grid_and_sigma(res: SLQResult, grid: Tensor | int, sigma: float | None) -> tuple[Tensor,
                                                                                        float]:
    used = res.nodes[res.weights > 0]
    lo = float(used.min()) if used.numel() else 0.0
    hi = float(used.max()) if used.numel() else 0.0
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.01
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}.")
    if isinstance(grid, int):
        grid_t = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid, dtype=_F64)
    else:
        grid_t = grid.detach().to("cpu", _F64).reshape(-1)
    return grid_t, float(sigma)


@dataclass(frozen=True)
class SLQCount:
    """SLQ estimate of the number of eigenvalues with ``|lambda| > threshold``.

    Attributes:
        estimate: Mean over probes of ``n * sum_j w_j [|theta_j| > threshold]``.
        standard_error: Standard deviation across probes / ``sqrt(num_probes)`` (0 for one
            probe). This is the Monte Carlo error only, not the quadrature bias.
        per_probe: ``(num_probes,)`` per-probe estimates.
        threshold: The absolute threshold.
    """

    estimate: float
    standard_error: float
    per_probe: Tensor
    threshold: float


def count_from_slq(res: SLQResult, threshold: float) -> SLQCount:
    """Count ``|lambda| > threshold`` from an existing :class:`SLQResult` (the step function
    on the Gauss nodes; :func:`interpolated_count` is the less biased rule)."""
    per_probe = res.trace_estimates(lambda t: (t.abs() > threshold).to(_F64))
    p = per_probe.numel()
    se = float(per_probe.std(unbiased=True) / math.sqrt(p)) if p > 1 else 0.0
    return SLQCount(float(per_probe.mean()), se, per_probe, float(threshold))


def _radau_cdf_bracket(T: Tensor, beta: float, t: float) -> tuple[float, float]:
    """Bounds ``(lower, upper)`` on ``mu((-inf, t))`` and ``mu((-inf, t])`` for the measure
    whose first Lanczos coefficients are ``T`` (and the next off-diagonal ``beta``), from the
    Gauss-Radau rule with a node prescribed at ``t``.

    Golub (1973): extend ``T`` by one row whose diagonal ``t + delta_k``, with ``(T - t I)
    delta = beta^2 e_k``, makes ``t`` an eigenvalue of the extended matrix; its eigenvalues and
    squared first eigenvector components are the nodes and weights. By the
    Chebyshev-Markov-Stieltjes-Krein extremal property of a rule with a node at ``t``, every
    measure with the same first moments has ``sum_{theta_j < t} w_j <= mu((-inf, t))`` and
    ``mu((-inf, t]) <= sum_{theta_j <= t} w_j``: the bracket is the weight of the node at
    ``t`` alone, the tightest the moments allow, and no node drifts across the threshold.
    """
    k = T.shape[0]
    if beta == 0.0:  # invariant subspace: the Gauss rule is the measure itself
        theta, S = torch.linalg.eigh(T)
        w = S[0] ** 2
        below = float(w[theta < t].sum())
        return below, float(w[theta <= t].sum())
    shifted = T - t * torch.eye(k, dtype=T.dtype)
    rhs = torch.zeros(k, dtype=T.dtype)
    rhs[-1] = beta**2
    try:
        delta = torch.linalg.solve(shifted, rhs)
    except RuntimeError:  # t is a Ritz value: nudge it within rounding
        delta = torch.linalg.solve(shifted - 1e-12 * max(1.0, abs(t)) * torch.eye(k, dtype=T.dtype),
                                   rhs)
    ext = torch.zeros(k + 1, k + 1, dtype=T.dtype)
    ext[:k, :k] = T
    ext[k, k - 1] = ext[k - 1, k] = beta
    ext[k, k] = t + delta[-1]
    theta, S = torch.linalg.eigh(ext)
    w = S[0] ** 2
    at = int((theta - t).abs().argmin())
    below = float(w[theta < t].sum()) - (float(w[at]) if float(theta[at]) < t else 0.0)
    return below, below + float(w[at])


def radau_count(res: SLQResult, threshold: float, depths: int = 4) -> tuple[Tensor, Tensor]:
    """Per-probe SLQ counts of ``|lambda| > threshold`` from Gauss-Radau rules with nodes
    prescribed at ``+-threshold``, and the half-widths of their guaranteed brackets.

    Each probe's quadratic form ``z^T 1[|H| > t] z / n`` equals ``mass - mu([-t, t])`` for its
    spectral measure ``mu``. The Radau rules at ``t`` and ``-t`` bound ``mu((-inf, t])`` and
    ``mu((-inf, -t))`` (see :func:`_radau_cdf_bracket`) at every Lanczos depth; the brackets
    of the last ``depths`` depths are intersected (each is valid, so their intersection is)
    and the estimate is its midpoint. The half-width bounds the quadrature error of the probe
    in exact arithmetic; without reorthogonalisation the Gauss rules stay accurate (Knizhnerman
    1996) and so, in practice, do the brackets.

    Returns:
        ``(counts, half_widths)``, both ``(num_probes,)`` float64.
    """
    if not res.tridiagonals:
        raise ValueError("radau_count needs an SLQResult with its tridiagonal matrices.")
    counts = torch.zeros(res.num_probes, dtype=_F64)
    half = torch.zeros(res.num_probes, dtype=_F64)
    scales = res.scales if res.scales is not None else torch.ones(res.num_probes, dtype=_F64)
    betas = res.residual_betas
    for i, T in enumerate(res.tridiagonals):
        m = T.shape[0]
        if m == 0:
            continue
        lo_in, hi_in = -math.inf, math.inf  # bracket of mu([-t, t]) (normalised to mass 1)
        for k in range(max(1, m - depths + 1), m + 1):
            beta = float(T[k, k - 1]) if k < m else (float(betas[i]) if betas is not None
                                                      else 0.0)
            Tk = T[:k, :k]
            up_lo, up_hi = _radau_cdf_bracket(Tk, beta, threshold)  # mu(<t), mu(<=t)
            dn_lo, dn_hi = _radau_cdf_bracket(Tk, beta, -threshold)  # mu(<-t), mu(<=-t)
            # mu([-t, t]) = mu(<=t) - mu(<-t)
            lo_in = max(lo_in, up_lo - dn_hi)
            hi_in = min(hi_in, up_hi - dn_lo)
        if hi_in < lo_in:  # rounding: the brackets barely miss each other
            lo_in = hi_in = (lo_in + hi_in) / 2
        scale = float(scales[i])
        counts[i] = res.n * scale * (1.0 - (lo_in + hi_in) / 2)
        half[i] = res.n * scale * (hi_in - lo_in) / 2
    return counts, half


def slq_count_above(
    A: LinearOperator | Tensor,
    threshold: float,
    num_probes: int = 10,
    num_iter: int = 80,
    seed: int = 0,
) -> SLQCount:
    """SLQ estimate of ``#{i : |lambda_i| > threshold}`` with its standard error.

    Args:
        A: Symmetric operator (or dense symmetric matrix); a ``ProjectedOperator`` for a
            deflated count, see :func:`slq`.
        threshold: Absolute threshold (``>= 0``).
        num_probes: Number of Rademacher probes.
        num_iter: Lanczos steps per probe.
        seed: Seed of the probes.

    Returns:
        An :class:`SLQCount`.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.measures import HessianVectorProduct
        >>> from lightning_plasticity.measures.lanczos import slq_count_above
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
        >>> hvp = HessianVectorProduct(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))
        >>> c = slq_count_above(hvp, threshold=1e-3, num_probes=5)
        >>> c.per_probe.shape  # 5 probes: c.estimate is their mean, c.standard_error its SE
        torch.Size([5])
        >>> exact = int((torch.linalg.eigvalsh(hvp.dense()).abs() > 1e-3).sum())
        >>> bool(abs(c.estimate - exact) < 3 * c.standard_error)
        True
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}.")
    res = slq(A, num_probes, num_iter, seed)
    return count_from_slq(res, threshold)

