"""Gradient interference between examples: per-example gradient cosines and their rank.

For a probe batch ``(x_i, y_i)``, ``i = 1..n``, let ``g_i = d loss(f(x_i; theta), y_i) /
d theta`` be the per-example gradients (over the selected parameters, flattened and
concatenated) and ``G = [g_i . g_j]`` their ``n x n`` Gram matrix. Then:

* cosine similarity matrix ``C_ij = g_i . g_j / (||g_i|| ||g_j||)`` (``0`` in any row or column
  of an example whose gradient is exactly zero, where the cosine is undefined);
* mean off-diagonal cosine ``(1 / (n (n - 1))) sum_{i != j} C_ij``: positive when a step on one
  example also lowers the loss on the others (generalisation), negative when it raises it
  (interference); ``nan`` for ``n = 1``;
* numerical rank of the ``n x P`` gradient matrix: its singular values are
  ``sigma_i = sqrt(eig_i(G))``, and the rank counts ``sigma_i > rtol * sigma_1``.

Lyle et al. (2023), "Understanding plasticity in neural networks", relate plasticity loss to the
structure of this (normalised) gradient covariance: networks that lost plasticity show large
blocks of strongly correlated (or anti-correlated) per-example gradients and a low-rank
gradient matrix.

Per-example gradients come from ``torch.func``: ``vmap(grad(loss of functional_call on one
example))``, so each example is run as a batch of one. The model must therefore not couple the
examples of a batch: BatchNorm in train mode is rejected (use eval mode, as the measurement
callbacks do). Dropout in train mode draws an independent mask per example from a forked RNG
(the global RNG state is restored).

DDP: the measurement is not a sum over examples (it compares every pair), so the callback
computes it on the *full* probe batch on every rank; every rank gets the same result and no
reduce is needed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.utils import _pytree as pytree

from lightning_plasticity.core.batch import batch_size, slice_batch
from lightning_plasticity.core.isolation import forked_rng, preserved_buffers
from lightning_plasticity.measures.parameter_selection import NamedParams, model_parameters

__all__ = [
    "per_example_gradient_gram",
    "GradientInterference",
    "gradient_interference",
    "gradient_interference_from_gram",
    "per_example_gradients",
]

#: ``loss_fn(model_output, target)`` for a batch of one example, a scalar (or one element).
ExampleLossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class GradientInterference:
    """Per-example gradient similarities of a probe batch.

    Attributes:
        cosine: ``(n, n)`` float64 cosine similarities ``C_ij``.
        gram: ``(n, n)`` float64 inner products ``g_i . g_j``.
        grad_norms: ``(n,)`` float64 ``||g_i||``.
        mean_cosine: Mean off-diagonal cosine (``nan`` for ``n = 1``).
        singular_values: ``(n,)`` float64 singular values of the gradient matrix, descending.
        rank: ``#{sigma_i > rtol * sigma_1}``.
        rank_fraction: ``rank / n``.
        rtol: The relative tolerance used.
        num_params: Number of parameters the gradients cover.
    """

    cosine: Tensor
    gram: Tensor
    grad_norms: Tensor
    mean_cosine: float
    singular_values: Tensor
    rank: int
    rank_fraction: float
    rtol: float
    num_params: int

    def scalars(self) -> dict[str, float]:
        """``mean_cosine``, ``rank``, ``rank_fraction`` and the mean gradient norm, for logging.

        Example::

            >>> import torch
            >>> import torch.nn.functional as F
            >>> from torch import nn
            >>> from lightning_plasticity.measures.gradient_interference import (
            ...     gradient_interference)
            >>> _ = torch.manual_seed(0)
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
            >>> x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
            >>> result = gradient_interference(model, F.cross_entropy, x, y)
            >>> logged = {f"grads/{k}": v for k, v in result.scalars().items()}
            >>> sorted(logged)
            ['grads/mean_cosine', 'grads/mean_grad_norm', 'grads/rank', 'grads/rank_fraction']
            >>> logged["grads/rank"], logged["grads/rank_fraction"]  # 6 independent gradients
            (6.0, 1.0)
            >>> # in a LightningModule or Callback hook: pl_module.log_dict(logged)
        """
        out = {
            "mean_cosine": self.mean_cosine,
            "rank": float(self.rank),
            "rank_fraction": self.rank_fraction,
            "mean_grad_norm": float(self.grad_norms.mean()) if self.grad_norms.numel() else 0.0,
        }
        return {k: v for k, v in out.items() if not math.isnan(v)}


def per_example_gradients(
    model: nn.Module,
    loss_fn: ExampleLossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: NamedParams | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Gradients of ``loss_fn(model(x_i[None]), y_i[None])`` for every example ``i``.

    Args:
        model: The model (eval mode unless it has no batch coupling; not modified).
        loss_fn: ``loss_fn(output, target)`` on a batch of one, e.g. ``F.cross_entropy``; a
            non-scalar result is summed.
        inputs: ``(n, ...)`` inputs.
        targets: ``(n, ...)`` targets.
        params: ``(name, parameter)`` pairs to differentiate (``select_parameters``); default
            all trainable parameters. The others are held fixed.
        chunk_size: Examples per vectorised chunk (``torch.func.vmap``); default all at once.

    Returns:
        Parameter name -> ``(n, *parameter.shape)`` per-example gradients (detached).

    Raises:
        ValueError: On a BatchNorm in train mode, mismatched batch sizes or an empty selection.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.measures.gradient_interference import (
        ...     per_example_gradients)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
        >>> grads = per_example_gradients(model.eval(), F.cross_entropy, x, y)
        >>> grads["0.weight"].shape  # (n, out, in)
        torch.Size([6, 8, 4])
        >>> sorted(grads)
        ['0.bias', '0.weight', '2.bias', '2.weight']
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                f"{name or 'the model'} is a BatchNorm in train mode, which couples the examples "
                "of the batch, so per-example gradients are undefined; put the model in eval "
                "mode (model.eval()) first."
            )
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise ValueError("inputs and targets must be tensors with the examples along dim 0.")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs have {inputs.shape[0]} examples but targets {targets.shape[0]}; pass one "
            "target per input."
        )
    selected = model_parameters(model, params)
    return _vmapped_example_gradients(
        lambda batch: loss_fn(model(batch[0]), batch[1]).sum(), (inputs, targets), model,
        selected, inputs.shape[0], chunk_size=chunk_size)


def gradient_interference_from_gram(
    gram: Tensor, *, rtol: float | None = None, dtype: torch.dtype = torch.float64,
    num_params: int = 0,
) -> GradientInterference:
    """Cosines, mean off-diagonal cosine and numerical rank from the per-example Gram matrix.

    Args:
        gram: ``(n, n)`` ``[g_i . g_j]``.
        rtol: Relative tolerance on singular values; default
            ``max(n * eps(dtype), sqrt(n * eps(float64)))``: NumPy's ``matrix_rank`` convention
            for gradients computed in ``dtype`` (with ``n`` for ``max(n, P)``), but no finer than
            the precision of singular values recovered from an ``n x n`` float64 Gram matrix.
        dtype: The dtype the gradients were computed in (for the default ``rtol``).
        num_params: Number of parameters, reported in the result.

    Returns:
        A :class:`GradientInterference`.

    Example::

        >>> import torch
        >>> from lightning_plasticity.measures.gradient_interference import (
        ...     gradient_interference_from_gram)
        >>> _ = torch.manual_seed(0)
        >>> g = torch.randn(8, 100, dtype=torch.float64)  # 8 gradients of 100 parameters
        >>> result = gradient_interference_from_gram(g @ g.T)
        >>> result.rank, result.rank_fraction, result.cosine.shape
        (8, 1.0, torch.Size([8, 8]))
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square (n, n) matrix, got {tuple(gram.shape)}.")
    if rtol is not None and rtol < 0:
        raise ValueError(f"rtol must be nonnegative, got {rtol}.")
    G = gram.detach().to(torch.float64)
    G = (G + G.T) / 2
    n = G.shape[0]
    f64_eps = torch.finfo(torch.float64).eps
    tol = (
        rtol
        if rtol is not None
        else max(n * torch.finfo(dtype).eps, math.sqrt(max(n, 1) * f64_eps))
    )
    norms = G.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cosine = torch.where(denom > 0, G / torch.where(denom > 0, denom, 1.0), 0.0).clamp(-1, 1)
    if n > 1:
        off = ~torch.eye(n, dtype=torch.bool, device=G.device)
        mean_cosine = float(cosine[off].mean())
    else:
        mean_cosine = math.nan
    sv = torch.linalg.eigvalsh(G).clamp_min(0).flip(0).sqrt()
    rank = int((sv > tol * sv[0]).sum()) if n > 0 and sv[0] > 0 else 0
    return GradientInterference(
        cosine=cosine,
        gram=G,
        grad_norms=norms,
        mean_cosine=mean_cosine,
        singular_values=sv,
        rank=rank,
        rank_fraction=rank / n if n > 0 else math.nan,
        rtol=float(tol),
        num_params=int(num_params),
    )


def _vmapped_example_gradients(loss_of_batch: Callable[[Any], Tensor], batch: Any,
                               module: nn.Module, named: Sequence[tuple[str, Tensor]], n: int,
                               chunk_size: int | None = None) -> dict[str, Tensor]:
    """Per-example gradients ``name -> (n, *shape)`` in one vectorised call (``torch.func``).

    Each example is the sub-batch of one (its per-example tensors with a leading dimension of
    1), and ``module``'s parameters ``named`` are swapped for ``vmap``'s by name for the
    duration of the loss, so any loss of a batch works as long as it is ``vmap``-able (no
    ``.item()``, no data-dependent Python control flow); otherwise this raises. The global RNG
    (dropout masks, drawn per example) and the buffers are restored afterwards.
    """
    from torch.nn.utils.stateless import _reparametrize_module

    leaves, spec = pytree.tree_flatten(batch)
    batched = [isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n for t in leaves]
    in_dims = pytree.tree_unflatten([0 if b else None for b in batched], spec)

    def example_loss(params: dict[str, Tensor], example: Any) -> Tensor:
        flat, _ = pytree.tree_flatten(example)
        sub = pytree.tree_unflatten(
            [t.unsqueeze(0) if b else t for t, b in zip(flat, batched, strict=True)], spec)
        with _reparametrize_module(module, params):
            return loss_of_batch(sub).reshape(())

    primals = {name: p.detach() for name, p in named}
    device = named[0][1].device
    with forked_rng(device=device), preserved_buffers(module), warnings.catch_warnings():
        # vmap falls back to a (correct) slow loop for ops without a batching rule (attention).
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        grads = vmap(grad(example_loss), in_dims=(None, in_dims), chunk_size=chunk_size,
                     randomness="different")(primals, batch)
    return {name: g.detach() for name, g in grads.items()}


def per_example_gradient_gram(
    loss_of_batch: Callable[[Any], Tensor],
    batch: Any,
    params: Sequence[Tensor] | Sequence[tuple[str, Tensor]],
    module: nn.Module | None = None,
) -> tuple[Tensor, int, torch.dtype]:
    """Gram matrix ``[g_i . g_j]`` of per-example gradients of any loss of a batch.

    ``g_i`` is the gradient of ``loss_of_batch(example i)``, the loss on the sub-batch holding
    only example ``i`` (sliced from any batch structure: tensors, tuples, dicts), so a module's
    own loss gives per-example gradients without a ``forward`` or a guessed loss: for a loss
    that averages over the batch, the loss of a batch of one is that example's loss. ``n``
    backward passes; the ``n x P`` gradients are held at once (float32 or the parameters' dtype).
    With ``module`` and named ``params`` (``(name, parameter)`` pairs of ``module``) the ``n``
    gradients come from one vectorised ``torch.func`` call when the loss allows it (several times
    faster), else from the loop; both give the same gradients.

    Returns:
        ``(gram (n, n) float64, number of parameters, gradient dtype)``.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Linear(3, 2)
        >>> batch = {"x": torch.randn(4, 3), "y": torch.tensor([0, 1, 0, 1])}
        >>> loss = lambda b: F.cross_entropy(net(b["x"]), b["y"])
        >>> gram, num_params, _ = per_example_gradient_gram(loss, batch, list(net.parameters()))
        >>> gram.shape, num_params
        (torch.Size([4, 4]), 8)
    """
    n = batch_size(batch)
    if n is None or n == 0:
        raise ValueError("the probe batch has no examples (no tensor with a batch dimension).")
    params = list(params)
    if not params:
        raise ValueError("no parameters to differentiate (all frozen?).")
    named = [p for p in params if isinstance(p, tuple)]
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    if module is not None and len(named) == len(params):
        try:
            grads = _vmapped_example_gradients(loss_of_batch, batch, module, named, n)
        except Exception:  # not vmap-able (e.g. .item() in the loss): loop over examples
            grads = None
        if grads is not None:
            G = torch.cat([grads[name].reshape(n, -1) for name, _ in named], dim=1)
            return _gram(G), G.shape[1], G.dtype
    params = tensors
    rows = []
    for i in range(n):
        loss = loss_of_batch(slice_batch(batch, i, i + 1))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([
            (torch.zeros_like(p) if g is None else g.detach()).reshape(-1)
            for p, g in zip(params, grads, strict=True)]))
    G = torch.stack(rows)
    return _gram(G), G.shape[1], G.dtype


def _gram(G: Tensor) -> Tensor:
    if G.shape[1] >= 1 << 22:  # very large models: a float64 copy of G would not fit
        return (G @ G.T).to(torch.float64)
    G64 = G.to(torch.float64)  # converted once: the conversion costs as much as the product
    return G64 @ G64.T


def gradient_interference(
    model: nn.Module,
    loss_fn: ExampleLossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: NamedParams | None = None,
    rtol: float | None = None,
    chunk_size: int | None = None,
) -> GradientInterference:
    """Cosine similarity matrix, mean cosine and rank of the per-example gradients.

    Definitions in the module docstring (Lyle et al., 2023). Memory: the ``n x P`` per-example
    gradients are held at once (restrict ``params`` for large models). Under DDP, call it on
    the full probe batch on every rank; no reduce is needed.

    Args:
        model: The model (eval mode for BatchNorm; not modified).
        loss_fn: ``loss_fn(output, target)`` on a batch of one example.
        inputs: ``(n, ...)`` probe inputs.
        targets: ``(n, ...)`` targets.
        params: Parameters to differentiate (``select_parameters``); default all trainable.
        rtol: Relative singular-value tolerance of the rank (see
            :func:`gradient_interference_from_gram`).
        chunk_size: Examples per vectorised chunk.

    Returns:
        A :class:`GradientInterference`.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.measures.gradient_interference import (
        ...     gradient_interference)
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
        >>> x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
        >>> result = gradient_interference(model, F.cross_entropy, x, y)
        >>> -1 <= result.mean_cosine <= 1, result.rank, result.num_params
        (True, 6, 67)
    """
    grads = per_example_gradients(
        model, loss_fn, inputs, targets, params=params, chunk_size=chunk_size
    )
    n = inputs.shape[0]
    first = next(iter(grads.values()))
    gram = torch.zeros(n, n, dtype=torch.float64, device=first.device)
    num_params = 0
    for g in grads.values():
        flat = g.reshape(n, -1).to(torch.float64)
        gram += flat @ flat.T
        num_params += flat.shape[1]
    return gradient_interference_from_gram(
        gram, rtol=rtol, dtype=first.dtype, num_params=num_params
    )
