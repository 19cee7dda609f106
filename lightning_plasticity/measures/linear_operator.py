"""Symmetric linear operators: the one interface every curvature routine takes.

A :class:`LinearOperator` is an ``n x n`` symmetric matrix known only through its products: it
has a ``shape``, a ``dtype`` and a ``device``, and ``A @ x`` works for a vector ``(n,)`` and for
a block ``(n, k)`` (the interface of curvlinops and ``scipy.sparse.linalg``). The Hessian
(:class:`~lightning_plasticity.measures.hvp.HessianVectorProduct`) is one; so is a dense matrix
(:class:`MatrixOperator`), a pair of functions (:class:`CallableOperator`) and a deflated
operator ``P A P`` with ``P = I - V V^T`` (:class:`ProjectedOperator`). Every operator counts
the products it computed (:attr:`LinearOperator.num_matvecs`; a block of ``k`` columns counts
``k``), which is how the eigensolvers report their cost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CallableOperator",
    "LinearOperator",
    "MatrixOperator",
    "ProjectedOperator",
    "as_operator",
]


class LinearOperator:
    """A symmetric ``n x n`` operator known through products.

    Subclasses implement :meth:`_matvec` and may override :meth:`_matmat` (default: one
    :meth:`_matvec` per column) when a block is cheaper than its columns one by one.

    Args:
        n: The dimension.
        dtype: The dtype of the vectors the operator takes and returns.
        device: Their device.

    Example::

        >>> import torch
        >>> from lightning_plasticity.measures.linear_operator import LinearOperator
        >>> class Diagonal(LinearOperator):
        ...     def __init__(self, d):
        ...         super().__init__(d.numel(), d.dtype, d.device)
        ...         self.d = d
        ...     def _matvec(self, x):
        ...         return self.d * x
        >>> A = Diagonal(torch.tensor([1.0, 2.0, 3.0]))
        >>> A.shape, A @ torch.ones(3)
        ((3, 3), tensor([1., 2., 3.]))
        >>> (A @ torch.eye(3)).diagonal(), A.num_matvecs  # a block of 3 counts 3 products
        (tensor([1., 2., 3.]), 4)
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | str) -> None:
        if n < 1:
            raise ValueError(f"a LinearOperator needs a dimension >= 1, got {n}.")
        self.n = int(n)
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def _matvec(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _matmat(self, X: Tensor) -> Tensor:
        return torch.stack([self._matvec(X[:, j]) for j in range(X.shape[1])], dim=1)

    def __matmul__(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() not in (1, 2) or x.shape[0] != self.n:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"an operator of shape {self.shape} multiplies a vector ({self.n},) or a block "
                f"({self.n}, k), got {shape}."
            )
        x = x.to(dtype=self.dtype, device=self.device)
        if x.dim() == 1:
            self.num_matvecs += 1
            return self._matvec(x)
        self.num_matvecs += x.shape[1]
        if x.shape[1] == 0:
            return x.clone()
        return self._matmat(x)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` on float64 NumPy vectors (for ``eigsh``,
        ``cg``, ...); products are computed in this operator's dtype on its device.

        Example::

            >>> import torch
            >>> from scipy.sparse.linalg import eigsh
            >>> from lightning_plasticity.measures.linear_operator import MatrixOperator
            >>> A = MatrixOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
            >>> round(float(eigsh(A.to_scipy(), k=1, which="LA")[0][0]), 8)
            10.0
        """
        import numpy as np
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        def apply(x: Any) -> Any:
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
            out = self @ (t.reshape(-1) if t.dim() == 2 and t.shape[1] == 1 else t)
            return out.detach().to("cpu", torch.float64).numpy().reshape(x.shape)

        return ScipyLinearOperator(self.shape, matvec=apply, matmat=apply, rmatvec=apply,
                                   dtype=np.float64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, dtype={self.dtype}, device={self.device})"


class MatrixOperator(LinearOperator):
    """A dense symmetric matrix as an operator.

    Example::

        >>> import torch
        >>> from lightning_plasticity.measures.linear_operator import MatrixOperator
        >>> A = MatrixOperator(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> A @ torch.tensor([1.0, 1.0])
        tensor([3., 3.])
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"MatrixOperator needs a square matrix, got {tuple(matrix.shape)}.")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matvec(self, x: Tensor) -> Tensor:
        return self.matrix @ x

    def _matmat(self, X: Tensor) -> Tensor:
        return self.matrix @ X


class CallableOperator(LinearOperator):
    """An operator given by a product function (and optionally a faster block product).

    Example::

        >>> import torch
        >>> from lightning_plasticity.measures.linear_operator import CallableOperator
        >>> A = CallableOperator(lambda v: 2 * v, n=3, dtype=torch.float32)
        >>> A @ torch.ones(3), (A @ torch.ones(3, 2)).shape
        (tensor([2., 2., 2.]), torch.Size([3, 2]))
    """

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        n: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        matmat: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(n, dtype, device)
        self._fn, self._block_fn = matvec, matmat

    def _matvec(self, x: Tensor) -> Tensor:
        return self._fn(x)

    def _matmat(self, X: Tensor) -> Tensor:
        return self._block_fn(X) if self._block_fn is not None else super()._matmat(X)


class ProjectedOperator(LinearOperator):
    """``P A P`` with the orthogonal projector ``P = I - V V^T`` (deflation of ``V``'s span).

    ``V`` has orthonormal columns, typically converged eigenvectors of ``A``; the projected
    operator has the same spectrum as ``A`` except that ``V``'s eigenvalues become zeros. A
    product costs one product of ``A``: vectors already inside ``range(P)`` (Lanczos vectors
    started from a projected vector) need only the projection after ``A`` (``P A P x = P A x``
    for ``x = P x``), so :meth:`project` is applied to the start vectors and after each product.

    Args:
        base: The operator ``A``.
        basis: ``(n, d)`` orthonormal columns ``V`` (``d`` may be 0).
        assume_projected: Skip the projection before ``A`` (inputs are in ``range(P)``).

    Example::

        >>> import torch
        >>> from lightning_plasticity.measures.linear_operator import (
        ...     MatrixOperator, ProjectedOperator)
        >>> A = MatrixOperator(torch.diag(torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64)))
        >>> V = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)  # deflate lambda = 5
        >>> P = ProjectedOperator(A, V)
        >>> P @ torch.ones(3, dtype=torch.float64)
        tensor([0., 2., 1.], dtype=torch.float64)
    """

    def __init__(self, base: LinearOperator, basis: Tensor, assume_projected: bool = False
                 ) -> None:
        if basis.dim() != 2 or basis.shape[0] != base.n:
            raise ValueError(
                f"the deflation basis must have shape ({base.n}, d), got {tuple(basis.shape)}.")
        super().__init__(base.n, base.dtype, base.device)
        self.base, self.basis = base, basis.to(base.device).contiguous()
        self._basis_t = self.basis.T.contiguous()  # V^T x is the hot product: keep it dense
        self.assume_projected = assume_projected

    @property
    def rank_deflated(self) -> int:
        return int(self.basis.shape[1])

    def project(self, x: Tensor) -> Tensor:
        """``P x`` for a vector or a block (in the basis' dtype)."""
        if self.basis.shape[1] == 0:
            return x
        x = x.to(self.basis.dtype).contiguous()
        coefficients = self._basis_t @ x
        if x.dim() == 1:
            return torch.addmv(x, self.basis, coefficients, alpha=-1)
        return torch.addmm(x, self.basis, coefficients, alpha=-1)

    def _matvec(self, x: Tensor) -> Tensor:
        if not self.assume_projected:
            x = self.project(x).to(self.dtype)
        return self.project(self.base @ x).to(self.dtype)

    _matmat = _matvec  # the same code serves a vector and a block


def as_operator(A: LinearOperator | Tensor) -> LinearOperator:
    """``A`` itself if it is a :class:`LinearOperator`, a :class:`MatrixOperator` for a dense
    square tensor.

    Example::

        >>> import torch
        >>> from lightning_plasticity.measures.linear_operator import as_operator
        >>> as_operator(torch.eye(2))
        MatrixOperator(n=2, dtype=torch.float32, device=cpu)
    """
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, Tensor):
        return MatrixOperator(A)
    raise TypeError(
        f"expected a LinearOperator or a square tensor, got {type(A).__name__}; wrap a product "
        "function as CallableOperator(matvec, n, dtype, device)."
    )
