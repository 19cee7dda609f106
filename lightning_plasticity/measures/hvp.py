"""Exact Hessian-vector products of a model's loss, reusing one gradient graph.

All Hessian measurements in :mod:`lightning_plasticity.measures` are built on
:class:`HessianVectorProduct`: it evaluates the loss once, builds the gradient graph once with
``torch.autograd.grad(create_graph=True)`` and then computes every product ``H v`` by a second
backward pass through that graph (Pearlmutter's trick as double backward), so a product costs
about one backward pass and no forward pass.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_plasticity.core.isolation import forked_rng, preserved_buffers
from lightning_plasticity.measures.linear_operator import LinearOperator
from lightning_plasticity.measures.parameter_selection import NamedParams, select_parameters

__all__ = [
    "DEFAULT_MAX_DENSE_MEMORY_BYTES",
    "DEFAULT_MAX_DENSE_PARAMS",
    "HessianVectorProduct",
    "LossFn",
    "NamedParams",
    "Reduce",
    "resolve_params",
]

#: ``loss_fn(model, batch)`` returns the scalar loss (the mean over the batch).
LossFn = Callable[[nn.Module, Any], Tensor]
#: Averages a tensor across DDP ranks (all_reduce then divide by the world size), or ``None``.
Reduce = Callable[[Tensor], Tensor]

#: Default cap on the number of parameters for a dense Hessian. At 15k parameters a float64
#: Hessian is 1.8 GB and its eigendecomposition takes minutes on a few CPU cores; above it use
#: Lanczos-based estimates or measure a parameter block.
DEFAULT_MAX_DENSE_PARAMS = 15_000
#: Default cap on the memory a dense Hessian may use (see :meth:`HessianVectorProduct.dense`).
DEFAULT_MAX_DENSE_MEMORY_BYTES = 4 * 1024**3


def resolve_params(model: nn.Module, params: NamedParams | None) -> list[tuple[str, nn.Parameter]]:
    """Normalise a ``params`` argument to a validated list of ``(name, parameter)`` pairs.

    Args:
        model: The model the parameters belong to (used for the default and for names).
        params: ``None`` for all trainable parameters, or a selection from
            :func:`select_parameters`; bare parameters are named by their position in ``model``.

    Returns:
        Deduplicated ``(name, parameter)`` pairs sharing one dtype and device.

    Raises:
        ValueError: On an empty selection, a frozen parameter, or mixed dtypes/devices.

    Example::

        >>> from torch import nn
        >>> from lightning_plasticity.measures import select_parameters
        >>> from lightning_plasticity.measures.hvp import resolve_params
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> named = resolve_params(model, select_parameters(model, last_n_layers=1))
        >>> [name for name, _ in named]
        ['2.weight', '2.bias']
        >>> [name for name, _ in resolve_params(model, [model[0].bias])]  # bare parameters
        ['0.bias']
    """
    if params is None:
        return select_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    out: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for i, item in enumerate(params):
        if isinstance(item, tuple):
            name, p = item
        else:
            p = item
            name = names.get(id(p), f"<param {i}>")
        if not isinstance(p, Tensor):
            raise ValueError(
                f"params[{i}] is a {type(p).__name__}, expected a parameter or a (name, "
                "parameter) pair as returned by select_parameters()."
            )
        if id(p) in seen:
            continue
        if not p.requires_grad:
            raise ValueError(
                f"parameter {name!r} has requires_grad=False; the Hessian is taken with respect "
                "to trainable parameters only, so drop it from `params` (select_parameters() "
                "does) or unfreeze it."
            )
        seen.add(id(p))
        out.append((name, p))
    if not out:
        raise ValueError(
            "`params` is empty; pass None for all trainable parameters or a non-empty "
            "select_parameters() result."
        )
    dtypes = {p.dtype for _, p in out}
    devices = {p.device for _, p in out}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"the selected parameters mix dtypes {sorted(map(str, dtypes))} / devices "
            f"{sorted(map(str, devices))}; a flat Hessian needs one dtype and device, so select "
            "a block that shares them (select_parameters(model, modules=[...]))."
        )
    return out


def _twice_differentiable_attention() -> contextlib.AbstractContextManager[None]:
    """Force ``scaled_dot_product_attention`` (used by ``nn.MultiheadAttention`` and
    transformers) to its math backend: the fused flash / memory-efficient kernels have no
    second derivative, the math backend gives the same values and supports double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _symmetrise_(H: Tensor, block: int = 1024) -> None:
    """``H <- (H + H^T) / 2`` in place, block by block so no second ``n x n`` copy is made.

    Double backward is exact only up to rounding; eigvalsh needs exact symmetry.
    """
    n = H.shape[0]
    for i in range(0, n, block):
        for j in range(i, n, block):
            a = H[i : i + block, j : j + block]
            b = H[j : j + block, i : i + block]
            avg = (a + b.T) * 0.5
            a.copy_(avg)
            b.copy_(avg.T)


class HessianVectorProduct(LinearOperator):
    """Hessian-vector products of ``loss_fn(model, batch)`` w.r.t. selected parameters.

    A :class:`~lightning_plasticity.measures.linear_operator.LinearOperator`: ``hvp @ v`` for a
    vector, ``hvp @ V`` for a block of columns (one vmapped double backward per ``max_batch``
    columns), ``hvp.shape``, ``hvp.to_scipy()``. The Hessian is taken with respect to the
    flat concatenation of ``params`` (in order), so all vectors are 1-D tensors of length
    :attr:`num_params` on :attr:`device` in :attr:`dtype`.
    The loss is evaluated once, in the model's *current* mode: BatchNorm uses batch statistics
    in train mode and running statistics in eval mode, dropout is active in train mode (its mask
    is drawn once and then fixed for every product). Callers that want the deterministic
    curvature of the inference function put the model in eval mode first. During the forward,
    ``scaled_dot_product_attention`` is restricted to its math backend, because the fused
    attention kernels have no second derivative. The model is never
    modified: parameters, ``.grad``, ``requires_grad``, the mode, the buffers (restored if the
    forward updated them) and the global RNG state are left as they were.

    With ``reduce`` (DDP), the loss, the gradient, every product and the dense Hessian are
    passed through ``reduce`` so that every rank holds the same values, equal to those of one
    process on the whole batch when each rank's loss is the mean over an equal-sized shard.
    Every rank must then make the same sequence of calls.

    The object holds the autograd graph (activations of the forward pass and of the gradient)
    until :meth:`release` is called or it is garbage collected; it is also a context manager.

    Args:
        model: The model.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss.
        batch: The probe batch passed to ``loss_fn``.
        params: Parameters to differentiate, from :func:`select_parameters`; default all
            trainable parameters.
        reduce: Optional cross-rank average applied to every returned tensor.
        batched: Compute block products (:meth:`matmat`, :meth:`dense`) with one vmapped
            double backward per ``max_batch`` columns (``is_grads_batched``) where that is
            faster per vector than a loop of products (timed on the first block); a loop if
            the model contains an operation vmap cannot batch.
        max_batch: Columns per vmapped product (memory grows with it).

    Raises:
        ValueError: If the loss is not a scalar or does not depend on the selected parameters.
        FloatingPointError: If the loss is NaN or infinite on the probe batch.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.measures import HessianVectorProduct
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> hvp = HessianVectorProduct(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))
        >>> hvp.num_params
        67
        >>> v = torch.randn(hvp.num_params, dtype=hvp.dtype)
        >>> hv = hvp @ v  # H v; hvp.matvec(v) is the same
        >>> hv.shape, hvp.shape
        (torch.Size([67]), (67, 67))
        >>> (hvp @ torch.randn(hvp.num_params, 4)).shape  # a block: one batched product
        torch.Size([67, 4])
        >>> hvp.release()
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        params: NamedParams | None = None,
        reduce: Reduce | None = None,
        batched: bool = True,
        max_batch: int = 32,
    ) -> None:
        named = resolve_params(model, params)
        self.names: list[str] = [n for n, _ in named]
        self._params: list[nn.Parameter] = [p for _, p in named]
        self._reduce = reduce
        self._shapes = [p.shape for p in self._params]
        self._numels = [p.numel() for p in self._params]
        self.num_params: int = sum(self._numels)
        super().__init__(self.num_params, self._params[0].dtype, self._params[0].device)

        with (
            forked_rng(device=self.device),
            preserved_buffers(model),
            _twice_differentiable_attention(),
            torch.enable_grad(),
        ):
            loss = loss_fn(model, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                "loss_fn(model, batch) must return a scalar tensor (the mean loss), got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}."
            )
        loss = loss.reshape(())
        if not loss.requires_grad:
            raise ValueError(
                "the loss does not depend on the selected parameters (it has no autograd "
                "graph); check that loss_fn runs the model and that `params` are used in the "
                "forward pass, and do not call it under torch.no_grad()."
            )
        loss_value = self._apply_reduce(loss.detach())
        if not bool(torch.isfinite(loss_value)):
            raise FloatingPointError(
                f"the loss is NaN/inf ({loss_value.item()}) on the probe batch, so its Hessian is "
                "undefined; check the model for diverged parameters or pick another batch."
            )
        self.loss: Tensor = loss_value

        with torch.enable_grad():
            grads = torch.autograd.grad(loss, self._params, create_graph=True, allow_unused=True)
        if all(g is None for g in grads):
            raise ValueError(
                "the loss does not depend on any of the selected parameters "
                f"({', '.join(self.names[:5])}{', ...' if len(self.names) > 5 else ''}); select "
                "parameters used in the forward pass."
            )
        # Gradients used only linearly (e.g. a last bias) have no graph of their own: their
        # Hessian rows are zero and double backward must skip them.
        self._grads: list[Tensor | None] | None = list(grads)
        self._diff_index = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._gradient: Tensor | None = None
        # Block products use one vmapped double backward where that is faster per vector than
        # a loop (timed on the first block); None until tried, False if slower or if the
        # model has an op vmap rejects.
        self._batched_ok: bool | None = None if batched else False
        self.max_batch = max(1, int(max_batch))

    # ------------------------------------------------------------------ helpers
    def _apply_reduce(self, t: Tensor) -> Tensor:
        return self._reduce(t) if self._reduce is not None else t

    def _check_alive(self) -> list[Tensor | None]:
        if self._grads is None:
            raise RuntimeError(
                "this HessianVectorProduct was released; create a new one to compute products."
            )
        return self._grads

    def _flat_check(self, v: Tensor, name: str = "v") -> Tensor:
        if v.dim() != 1 or v.shape[0] != self.num_params:
            raise ValueError(
                f"{name} must be a 1-D tensor of length num_params={self.num_params}, got shape "
                f"{tuple(v.shape)}."
            )
        return v.to(dtype=self.dtype, device=self.device)

    def _hvp_raw(self, v: Tensor) -> Tensor:
        """``H v`` on this rank, without ``reduce``."""
        grads = self._check_alive()
        if not self._diff_index:
            return torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        chunks = v.split(self._numels)
        outputs = [grads[i] for i in self._diff_index]
        grad_outputs = [chunks[i].view(self._shapes[i]) for i in self._diff_index]
        with torch.enable_grad():
            hv = torch.autograd.grad(
                outputs, self._params, grad_outputs, retain_graph=True, allow_unused=True
            )
        return torch.cat(
            [
                (h if h is not None else torch.zeros_like(p)).reshape(-1)
                for h, p in zip(hv, self._params)
            ]
        ).detach()

    def _matmat_batched(self, V: Tensor) -> Tensor:
        """``H V`` by one vmapped double backward (``is_grads_batched``)."""
        grads = self._check_alive()
        k = V.shape[1]
        if not self._diff_index:
            return torch.zeros_like(V)
        chunks = V.T.split(self._numels, dim=1)
        outputs = [grads[i] for i in self._diff_index]
        grad_outputs = [
            chunks[i].reshape(k, *self._shapes[i]).contiguous() for i in self._diff_index
        ]
        with torch.enable_grad(), warnings.catch_warnings():
            # vmap falls back to a (correct) slow loop for ops without a batching rule.
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            hv = torch.autograd.grad(
                outputs, self._params, grad_outputs, retain_graph=True, allow_unused=True,
                is_grads_batched=True,
            )
        cols = [
            (h if h is not None else V.new_zeros(k, *p.shape)).reshape(k, -1)
            for h, p in zip(hv, self._params)
        ]
        return torch.cat(cols, dim=1).T.detach()

    def _matmat_raw(self, V: Tensor) -> Tensor:
        """``H V`` on this rank, without ``reduce``: batched where that is faster per vector.

        The first block is computed both ways and timed: the vmapped
        double backward wins on GPUs and on wide layers, a loop of single products often on a
        few CPU threads (``benchmarks/hvp_cost.py``); the faster one serves every later block.
        """
        k = V.shape[1]
        out = torch.empty_like(V)
        start = 0
        while start < k:
            stop = min(k, start + self.max_batch)
            block = V[:, start:stop]
            if self._batched_ok is not False and stop - start > 1:
                try:
                    if self._batched_ok is None:
                        out[:, start:stop] = self._race(block)
                    else:
                        out[:, start:stop] = self._matmat_batched(block)
                        self._batched_ok = True
                    start = stop
                    continue
                except RuntimeError:
                    if self._batched_ok:  # worked before: a genuine error (e.g. OOM)
                        raise
                    self._batched_ok = False
            for j in range(start, stop):
                out[:, j] = self._hvp_raw(V[:, j])
            start = stop
        return out

    def _race(self, block: Tensor) -> Tensor:
        """Compute ``H block`` batched and looped, keep the faster way (``_batched_ok``)."""
        def timed(fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            result = fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return result, time.perf_counter() - start

        batched, t_batched = timed(lambda: self._matmat_batched(block))
        _, t_loop = timed(lambda: torch.stack(
            [self._hvp_raw(block[:, j]) for j in range(block.shape[1])], dim=1))
        self._batched_ok = t_batched <= t_loop
        return batched

    # ------------------------------------------------------------------ public API
    @property
    def gradient(self) -> Tensor:
        """The flat gradient of the loss (detached, reduced)."""
        if self._gradient is None:
            grads = self._check_alive()
            flat = torch.cat(
                [
                    (g.detach() if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(grads, self._params)
                ]
            )
            self._gradient = self._apply_reduce(flat)
        return self._gradient

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters the Hessian is taken with respect to, in flat-vector order."""
        return list(self._params)

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``H v`` for a flat vector ``v`` of length :attr:`num_params` (reduced).

        Example::

            >>> import torch
            >>> import torch.nn.functional as F
            >>> from torch import nn
            >>> from lightning_plasticity.measures import HessianVectorProduct
            >>> _ = torch.manual_seed(0)
            >>> model, x, y = nn.Linear(3, 2), torch.randn(8, 3), torch.randint(0, 2, (8,))
            >>> loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])
            >>> hvp = HessianVectorProduct(model, loss_fn, (x, y))
            >>> hv = hvp.matvec(torch.ones(hvp.num_params, dtype=hvp.dtype))
            >>> hv.shape
            torch.Size([8])
        """
        return self @ self._flat_check(v)

    __call__ = matvec

    def _matvec(self, x: Tensor) -> Tensor:
        return self._apply_reduce(self._hvp_raw(x))

    def _matmat(self, X: Tensor) -> Tensor:
        return self._apply_reduce(self._matmat_raw(X))

    def matmat(self, V: Tensor) -> Tensor:
        """Return ``H V`` for an ``(num_params, k)`` block, reduced once for the whole block.

        Example::

            >>> import torch
            >>> import torch.nn.functional as F
            >>> from torch import nn
            >>> from lightning_plasticity.measures import HessianVectorProduct
            >>> _ = torch.manual_seed(0)
            >>> model, x, y = nn.Linear(3, 2), torch.randn(8, 3), torch.randint(0, 2, (8,))
            >>> loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])
            >>> hvp = HessianVectorProduct(model, loss_fn, (x, y))
            >>> HV = hvp.matmat(torch.eye(hvp.num_params, 3, dtype=hvp.dtype))
            >>> HV.shape
            torch.Size([8, 3])
            >>> e0 = torch.eye(hvp.num_params, dtype=hvp.dtype)[0]
            >>> torch.allclose(HV[:, 0], hvp.matvec(e0), atol=1e-6)  # column j is H e_j
            True
        """
        if V.dim() != 2 or V.shape[0] != self.num_params:
            raise ValueError(
                f"V must have shape (num_params={self.num_params}, k), got {tuple(V.shape)}."
            )
        return self @ V

    def dense_memory_bytes(self) -> int:
        """Estimated peak memory of :meth:`dense` (the matrix; it is symmetrised in place)."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_params**2 * itemsize

    def check_dense(
        self,
        max_params: int | None = DEFAULT_MAX_DENSE_PARAMS,
        max_memory_bytes: int | None = DEFAULT_MAX_DENSE_MEMORY_BYTES,
        extra_bytes: int = 0,
    ) -> None:
        """Raise ``ValueError`` if a dense Hessian exceeds the parameter or memory limit.

        Args:
            max_params: Largest allowed :attr:`num_params` (``None``: no limit).
            max_memory_bytes: Largest allowed estimated memory (``None``: no limit).
            extra_bytes: Memory the caller needs on top (e.g. an eigendecomposition).

        Example::

            >>> import torch
            >>> import torch.nn.functional as F
            >>> from torch import nn
            >>> from lightning_plasticity.measures import HessianVectorProduct
            >>> _ = torch.manual_seed(0)
            >>> model, x, y = nn.Linear(3, 2), torch.randn(8, 3), torch.randint(0, 2, (8,))
            >>> loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])
            >>> hvp = HessianVectorProduct(model, loss_fn, (x, y))
            >>> hvp.check_dense(max_params=5_000)  # 8 parameters: fine, returns None
            >>> hvp.check_dense(max_params=4)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
                ...
            ValueError: a dense Hessian over 8 parameters exceeds max_params=4; ...
        """
        n = self.num_params
        if max_params is not None and n > max_params:
            raise ValueError(
                f"a dense Hessian over {n} parameters exceeds max_params={max_params}; use a "
                "Lanczos-based method (method='lanczos'), measure a parameter block "
                "(params=select_parameters(model, last_n_layers=...)), or raise the limit."
            )
        need = self.dense_memory_bytes() + extra_bytes
        if max_memory_bytes is not None and need > max_memory_bytes:
            raise ValueError(
                f"a dense Hessian over {n} parameters needs about {need / 2**30:.2f} GiB, more "
                f"than max_memory_bytes={max_memory_bytes / 2**30:.2f} GiB; use "
                "method='lanczos', a parameter block (select_parameters), or raise the limit."
            )

    def dense(
        self,
        max_params: int | None = DEFAULT_MAX_DENSE_PARAMS,
        max_memory_bytes: int | None = DEFAULT_MAX_DENSE_MEMORY_BYTES,
    ) -> Tensor:
        """Return the full ``(n, n)`` Hessian: ``n`` products (batched), reduced once,
        symmetrised in place.

        Args:
            max_params: Largest allowed :attr:`num_params` (``None``: no limit).
            max_memory_bytes: Largest allowed estimated memory, see
                :meth:`dense_memory_bytes` (``None``: no limit).

        Raises:
            ValueError: If a limit is exceeded (the message names the parameter count).

        Example::

            >>> import torch
            >>> import torch.nn.functional as F
            >>> from torch import nn
            >>> from lightning_plasticity.measures import HessianVectorProduct
            >>> _ = torch.manual_seed(0)
            >>> model, x, y = nn.Linear(3, 2), torch.randn(8, 3), torch.randint(0, 2, (8,))
            >>> loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])
            >>> hvp = HessianVectorProduct(model, loss_fn, (x, y))
            >>> H = hvp.dense(max_params=2_000)
            >>> H.shape
            torch.Size([8, 8])
            >>> eigenvalues = torch.linalg.eigvalsh(H)
            >>> bool((eigenvalues > -1e-6).all())  # a linear model's cross-entropy is convex
            True
        """
        self.check_dense(max_params, max_memory_bytes)
        n = self.num_params
        H = torch.empty(n, n, dtype=self.dtype, device=self.device)
        eye_block = torch.zeros(n, self.max_batch, dtype=self.dtype, device=self.device)
        for start in range(0, n, self.max_batch):
            stop = min(n, start + self.max_batch)
            block = eye_block[:, : stop - start]
            block.zero_()
            block[start:stop] = torch.eye(stop - start, dtype=self.dtype, device=self.device)
            H[:, start:stop] = self._matmat_raw(block)
        self.num_matvecs += n
        H = self._apply_reduce(H)
        _symmetrise_(H)
        return H

    def release(self) -> None:
        """Drop the autograd graph; later products raise ``RuntimeError``.

        Example::

            >>> import torch
            >>> import torch.nn.functional as F
            >>> from torch import nn
            >>> from lightning_plasticity.measures import HessianVectorProduct
            >>> _ = torch.manual_seed(0)
            >>> model, x, y = nn.Linear(3, 2), torch.randn(8, 3), torch.randint(0, 2, (8,))
            >>> loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])
            >>> hvp = HessianVectorProduct(model, loss_fn, (x, y))
            >>> hvp.release()
            >>> hvp.matvec(torch.ones(hvp.num_params))  # doctest: +ELLIPSIS
            Traceback (most recent call last):
                ...
            RuntimeError: this HessianVectorProduct was released; create a new one ...
        """
        self._grads = None

    def __enter__(self) -> HessianVectorProduct:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
