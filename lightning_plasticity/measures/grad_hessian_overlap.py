"""How the gradient aligns with the Hessian's curvature directions.

Two measures, sharing one :class:`HessianVectorProduct` when computed together by
:func:`gradient_hessian_alignment`:

* :func:`gradient_hessian_overlap`: the cosine between ``g`` and ``H g``,
  ``g^T H g / (||g|| ||H g||)``, used by Lewandowski et al. ("Directions of curvature as an
  explanation for loss of plasticity", 2023/24) to ask whether the gradient still points into
  directions of curvature.
* :func:`gradient_topk_fraction`: the part of the gradient inside the top-``k`` Hessian
  eigenspace ``V_k``. As a norm ratio ``||V_k^T g|| / ||g||`` (``fraction``) and as its square
  ``||V_k^T g||^2 / ||g||^2`` (``fraction_squared``), the fraction of the gradient's squared
  norm (energy) that Gur-Ari, Roberts & Dyer ("Gradient descent happens in a tiny subspace",
  2018) report. Both are returned because the literature uses both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_plasticity.measures.hvp import HessianVectorProduct, LossFn, NamedParams, Reduce
from lightning_plasticity.measures.lanczos import EigenResult, top_eigenpairs

__all__ = [
    "GradientHessianAlignment",
    "GradientHessianOverlap",
    "GradientTopKFraction",
    "gradient_hessian_alignment",
    "gradient_hessian_overlap",
    "gradient_topk_fraction",
]

_F64 = torch.float64


@dataclass(frozen=True)
class GradientHessianOverlap:
    """Cosine between the gradient and the Hessian-gradient product.

    Attributes:
        overlap: ``g^T H g / (||g|| ||H g||)`` in ``[-1, 1]``; NaN when ``g`` or ``H g`` is 0.
        rayleigh_quotient: ``g^T H g / ||g||^2``, the curvature along the gradient (NaN when
            ``g`` is 0).
        gradient_norm: ``||g||``.
        hessian_gradient_norm: ``||H g||``.
    """

    overlap: float
    rayleigh_quotient: float
    gradient_norm: float
    hessian_gradient_norm: float

    def scalars(self) -> dict[str, float]:
        """The logged keys: ``grad_hessian_overlap``, ``grad_norm``, ``grad_rayleigh_quotient``."""
        return {"grad_hessian_overlap": self.overlap, "grad_norm": self.gradient_norm,
                "grad_rayleigh_quotient": self.rayleigh_quotient}


@dataclass(frozen=True)
class GradientTopKFraction:
    """Share of the gradient inside the top-``k`` Hessian eigenspace.

    Attributes:
        fraction: ``||V_k^T g|| / ||g||`` in ``[0, 1]`` (NaN when ``g`` is 0).
        fraction_squared: ``||V_k^T g||^2 / ||g||^2`` (Gur-Ari et al. 2018).
        k: Dimension of the eigenspace.
        eigenvalues: ``(k,)`` the eigenvalues spanning it.
        all_converged: Whether every eigenpair met the Lanczos tolerance.
        gradient_norm: ``||g||``.
    """

    fraction: float
    fraction_squared: float
    k: int
    eigenvalues: Tensor
    all_converged: bool
    gradient_norm: float


@dataclass(frozen=True)
class GradientHessianAlignment:
    """Both alignment measures from one Hessian-vector-product engine.

    Attributes:
        overlap: See :class:`GradientHessianOverlap`.
        topk: See :class:`GradientTopKFraction`.
        loss: The (reduced) loss on the batch.
    """

    overlap: GradientHessianOverlap
    topk: GradientTopKFraction
    loss: float


def _safe_div(a: float, b: float) -> float:
    return a / b if b > 0 and math.isfinite(b) else float("nan")


def _overlap(hvp: HessianVectorProduct) -> GradientHessianOverlap:
    g = hvp.gradient
    hg = (hvp @ g).to(_F64)
    g = g.to(_F64)
    g_norm = float(g.norm())
    hg_norm = float(hg.norm())
    ghg = float(g @ hg)
    return GradientHessianOverlap(
        overlap=_safe_div(ghg, g_norm * hg_norm),
        rayleigh_quotient=_safe_div(ghg, g_norm**2),
        gradient_norm=g_norm,
        hessian_gradient_norm=hg_norm,
    )


def _topk(hvp: HessianVectorProduct, eig: EigenResult) -> GradientTopKFraction:
    g = hvp.gradient.to(_F64)
    proj = eig.eigenvectors.to(_F64).T @ g
    g_norm = float(g.norm())
    frac_sq = _safe_div(float(proj @ proj), g_norm**2)
    return GradientTopKFraction(
        fraction=math.sqrt(min(frac_sq, 1.0)) if math.isfinite(frac_sq) else float("nan"),
        fraction_squared=min(frac_sq, 1.0) if math.isfinite(frac_sq) else float("nan"),
        k=int(eig.eigenvalues.numel()),
        eigenvalues=eig.eigenvalues,
        all_converged=bool(eig.converged.all()),
        gradient_norm=g_norm,
    )


def _eigs(
    hvp: HessianVectorProduct, k: int, which: Literal["LA", "LM"], tol: float | None,
    max_iter: int | None, seed: int,
) -> EigenResult:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    return top_eigenpairs(hvp, min(k, hvp.num_params), which=which, tol=tol,
                          max_iter=max_iter, seed=seed)


def gradient_hessian_overlap(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    params: NamedParams | None = None,
    reduce: Reduce | None = None,
) -> GradientHessianOverlap:
    """Cosine between the gradient and ``H g``: ``g^T H g / (||g|| ||H g||)``.

    Lewandowski et al. (2023/24) use it to measure whether the gradient lies in directions of
    curvature; 1 means ``g`` is an eigenvector of a positive eigenvalue, near 0 means the
    gradient sees little curvature. Costs one forward, one backward and one Hessian-vector
    product.

    Args:
        model: The model (not modified).
        loss_fn: ``loss_fn(model, batch)`` returns the scalar mean loss.
        batch: The probe batch.
        params: Parameter block from :func:`select_parameters`; default all trainable.
        reduce: Cross-rank average for DDP (see :class:`HessianVectorProduct`).

    Returns:
        A :class:`GradientHessianOverlap`.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.measures import gradient_hessian_overlap
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])
        >>> o = gradient_hessian_overlap(model, loss_fn, (x, y))
        >>> round(o.overlap, 2), round(o.rayleigh_quotient, 2)
        (0.88, 0.68)
    """
    with HessianVectorProduct(model, loss_fn, batch, params, reduce) as hvp:
        return _overlap(hvp)


def gradient_topk_fraction(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    k: int = 10,
    which: Literal["LA", "LM"] = "LA",
    *,
    params: NamedParams | None = None,
    reduce: Reduce | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    seed: int = 0,
) -> GradientTopKFraction:
    """Share of the gradient inside the top-``k`` Hessian eigenspace.

    ``fraction = ||V_k^T g|| / ||g||`` (a norm ratio) and ``fraction_squared`` (the share of
    the squared norm, as in Gur-Ari et al. 2018, who find it close to 1 for ``k`` = number of
    classes after a short training).

    Args:
        model: The model (not modified).
        loss_fn: ``loss_fn(model, batch)`` returns the scalar mean loss.
        batch: The probe batch.
        k: Eigenspace dimension.
        which: ``"LA"`` top (largest algebraic) eigenvalues, as in Gur-Ari et al.; ``"LM"``
            largest magnitude.
        params: Parameter block from :func:`select_parameters`; default all trainable.
        reduce: Cross-rank average for DDP (see :class:`HessianVectorProduct`).
        tol: Lanczos relative residual tolerance (see :func:`top_eigenpairs`).
        max_iter: Largest Krylov dimension.
        seed: Seed of the Lanczos start vector.

    Returns:
        A :class:`GradientTopKFraction`.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.measures import gradient_topk_fraction
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])
        >>> f = gradient_topk_fraction(model, loss_fn, (x, y), k=10)
        >>> f.k, f.all_converged, round(f.fraction_squared, 2)
        (10, True, 0.91)
        >>> all_26 = gradient_topk_fraction(model, loss_fn, (x, y), k=26)  # the whole space
        >>> round(all_26.fraction, 4)
        1.0
    """
    with HessianVectorProduct(model, loss_fn, batch, params, reduce) as hvp:
        return _topk(hvp, _eigs(hvp, k, which, tol, max_iter, seed))


def gradient_hessian_alignment(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    k: int = 10,
    which: Literal["LA", "LM"] = "LA",
    *,
    params: NamedParams | None = None,
    reduce: Reduce | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    seed: int = 0,
) -> GradientHessianAlignment:
    """:func:`gradient_hessian_overlap` and :func:`gradient_topk_fraction` at once, from one
    forward/backward pass and one top-``k`` eigendecomposition.

    Args:
        model: The model (not modified).
        loss_fn: ``loss_fn(model, batch)`` returns the scalar mean loss.
        batch: The probe batch.
        k: Eigenspace dimension for the top-k fraction.
        which: ``"LA"`` or ``"LM"``, see :func:`gradient_topk_fraction`.
        params: Parameter block from :func:`select_parameters`; default all trainable.
        reduce: Cross-rank average for DDP (see :class:`HessianVectorProduct`).
        tol: Lanczos relative residual tolerance.
        max_iter: Largest Krylov dimension.
        seed: Seed of the Lanczos start vector.

    Returns:
        A :class:`GradientHessianAlignment`.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.measures import gradient_hessian_alignment
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])
        >>> a = gradient_hessian_alignment(model, loss_fn, (x, y), k=10)
        >>> round(a.overlap.overlap, 2), round(a.topk.fraction, 2)
        (0.88, 0.95)
    """
    with HessianVectorProduct(model, loss_fn, batch, params, reduce) as hvp:
        overlap = _overlap(hvp)
        topk = _topk(hvp, _eigs(hvp, k, which, tol, max_iter, seed))
        return GradientHessianAlignment(overlap=overlap, topk=topk, loss=float(hvp.loss))
