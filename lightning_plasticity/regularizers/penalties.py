"""Plasticity regularizers as pure, differentiable penalty functions (no Lightning import).

Every function returns a 0-d tensor that keeps the autograd graph, so it can be added to a loss.
The mixins in :mod:`lightning_plasticity.regularizers.mixins` are thin Lightning shells that
call these functions in ``training_step``.

Parameters and anchors are given as sequences of tensors aligned by position (``params[i]`` is
compared with ``anchors[i]``). Anchors are treated as constants: they are detached and cast to
their parameter's device and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "LayerReduction",
    "effective_rank_penalty",
    "l2_init_penalty",
    "l2_penalty",
    "l2er_penalty",
    "second_moment_effective_rank",
    "wasserstein_init_penalty",
]

#: How :func:`effective_rank_penalty` combines layers of different widths.
LayerReduction = Literal["sum", "direct_sum"]


def _zero(params: Sequence[Tensor]) -> Tensor:
    if params:
        return params[0].new_zeros(())
    return torch.zeros(())


def _pairs(params: Iterable[Tensor], anchors: Iterable[Tensor],
           fn: str) -> tuple[list[Tensor], list[Tensor]]:
    params, anchors = list(params), list(anchors)
    if len(params) != len(anchors):
        raise ValueError(f"{fn}() needs one anchor per parameter tensor, got {len(params)} "
                         f"parameters and {len(anchors)} anchors.")
    for i, (p, a) in enumerate(zip(params, anchors)):
        if p.shape != a.shape:
            raise ValueError(f"{fn}(): parameter {i} has shape {tuple(p.shape)} but its anchor "
                             f"has shape {tuple(a.shape)}; pass the anchors in parameter order.")
    return params, [a.detach().to(device=p.device, dtype=p.dtype) for p, a in zip(params, anchors)]


def l2_penalty(params: Iterable[Tensor]) -> Tensor:
    """Squared L2 norm of all parameters, ``||theta||_2^2 = sum_i sum(p_i ** 2)``.

    Standard L2 regularization (Tikhonov; "weight decay" when added to the loss of plain SGD):
    the penalty is added to the loss, so unlike the optimizer's ``weight_decay`` it goes through
    Adam's preconditioning and does not depend on the optimizer. No factor 1/2.

    Args:
        params: parameter tensors.

    Returns:
        0-d tensor (0 for no parameters).

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.regularizers import l2_penalty
        >>> _ = torch.manual_seed(0)
        >>> model, x, y = nn.Linear(4, 2), torch.randn(8, 4), torch.randn(8, 2)
        >>> task_loss = F.mse_loss(model(x), y)
        >>> loss = task_loss + 1e-4 * l2_penalty(model.parameters())
        >>> loss.backward()
        >>> l2_penalty([torch.ones(2, 3), torch.full((2,), 2.0)])  # 6 * 1 + 2 * 4
        tensor(14.)
    """
    params = list(params)
    total = _zero(params)
    for p in params:
        total = total + p.square().sum()
    return total


def l2_init_penalty(params: Iterable[Tensor], anchors: Iterable[Tensor], squared: bool = True,
                    half: bool = False) -> Tensor:
    """Regenerative regularization: the L2 distance of the parameters to their initial values.

    Kumar, Marklund & Van Roy, "Maintaining plasticity in continual learning via regenerative
    regularization" (L2 Init, 2023) add ``lambda * ||theta - theta_0||_2^2`` to the loss, with
    ``theta_0`` the parameters at step 0 and ``||.||_2`` over all parameters as one vector. This is
    the default (``squared=True, half=False``). Implementations differ on two conventions, offered
    as options:

    * ``half=True`` multiplies by 1/2, the weight-decay convention whose gradient is
      ``lambda * (theta - theta_0)`` (the same ``lambda`` then means half the pull of the paper's).
    * ``squared=False`` uses the norm itself, ``||theta - theta_0||_2`` (a constant-magnitude pull
      of gradient ``(theta - theta_0) / ||theta - theta_0||``; 0 at ``theta_0``, where the norm
      has no gradient).

    Args:
        params: parameter tensors.
        anchors: their initial values ``theta_0``, in the same order and shapes.
        squared: squared distance (the paper) or the unsquared norm.
        half: multiply by 1/2.

    Returns:
        0-d tensor, 0 at ``params == anchors``.

    Raises:
        ValueError: if the number or shapes of ``params`` and ``anchors`` differ.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.regularizers import l2_init_penalty
        >>> _ = torch.manual_seed(0)
        >>> model, x, y = nn.Linear(4, 2), torch.randn(8, 4), torch.randn(8, 2)
        >>> theta_0 = [p.detach().clone() for p in model.parameters()]
        >>> l2_init_penalty(model.parameters(), theta_0).item()  # 0 at the initial parameters
        0.0
        >>> task_loss = F.mse_loss(model(x), y)
        >>> loss = task_loss + 1e-3 * l2_init_penalty(model.parameters(), theta_0)
        >>> loss.backward()
        >>> with torch.no_grad():
        ...     _ = model.bias.add_(1.0)  # move both biases by 1
        >>> round(l2_init_penalty(model.parameters(), theta_0).item(), 4)  # 1^2 + 1^2
        2.0
        >>> round(l2_init_penalty(model.parameters(), theta_0, squared=False).item(), 4)
        1.4142
    """
    params, anchors = _pairs(params, anchors, "l2_init_penalty")
    total = _zero(params)
    for p, a in zip(params, anchors):
        total = total + (p - a).square().sum()
    if not squared:
        # sqrt has an infinite derivative at 0; use the subgradient 0 there instead of NaN.
        positive = total > 0
        total = torch.where(positive, torch.where(positive, total, 1.0).sqrt(), 0.0)
    return total / 2 if half else total


def sort_order(values: Tensor, previous: Tensor | None = None) -> Tensor:
    """The permutation that sorts ``values`` (1-D), exactly; fast when ``previous`` nearly does.

    Parameters move little per optimizer step, so last step's order leaves the values nearly
    sorted. On CPU the values are re-sorted in that order with NumPy's stable sort (a Timsort /
    radix sort that runs in near-linear time on nearly sorted input: 2.6 ms instead of torch's
    6.3 ms for 78,400 weights here); elsewhere ``torch.argsort``. The result is a full sort
    either way, only the time depends on ``previous``.

    Example::

        >>> import torch
        >>> from lightning_plasticity.regularizers.penalties import sort_order
        >>> x = torch.tensor([0.3, -1.0, 2.0, 0.1])
        >>> order = sort_order(x)
        >>> x[order]
        tensor([-1.0000,  0.1000,  0.3000,  2.0000])
        >>> y = torch.tensor([0.3, -1.0, 0.05, 0.2])  # moved a little: two swapped places
        >>> y[sort_order(y, previous=order)]  # re-sorted starting from the old order
        tensor([-1.0000,  0.0500,  0.2000,  0.3000])
    """
    values = values.detach()
    if values.device.type != "cpu":
        return torch.argsort(values, stable=True)
    import numpy as np

    x = values.numpy()
    if previous is not None and previous.numel() == x.size:
        prev = previous.numpy()
        return torch.from_numpy(prev[np.argsort(x[prev], kind="stable")])
    return torch.from_numpy(np.argsort(x, kind="stable"))


def wasserstein_init_penalty(params: Iterable[Tensor], anchors: Iterable[Tensor],
                             anchors_sorted: bool = False,
                             orders: dict[int, Tensor] | None = None) -> Tensor:
    """Squared Wasserstein-2 distance of each tensor's value distribution to its initial one.

    For every parameter tensor ``p`` with ``n`` entries and initial values ``p_0``, the empirical
    distributions of their entries are compared with the squared 1-D Wasserstein-2 distance,
    which between two empirical distributions of ``n`` points each is the mean squared difference
    of the sorted values (the optimal coupling of 1-D samples matches them in sorted order)::

        W_2^2(p, p_0) = (1/n) * sum_k (sort(p)_k - sort(p_0)_k)^2

    The penalty is the sum over tensors. This is the Wasserstein initialization regularizer of
    Lewandowski et al. (2024; "Directions of curvature as an explanation for loss of plasticity",
    used as a baseline in "Learning continually by spectral regularization"): unlike L2 Init
    it lets each weight move arbitrarily far from its own initial value and only keeps the
    *distribution* of each tensor's weights close to the initialization distribution. It is 0 for
    any permutation of the initial entries within a tensor. The gradient flows through the sort
    (to each entry from the sorted position it occupies).

    Args:
        params: parameter tensors.
        anchors: their initial values, in the same order and shapes.
        anchors_sorted: the anchors are already ``anchor.flatten().sort().values`` reshaped to
            the parameter's shape (saves a sort per tensor and call).
        orders: a dict kept across calls (``{}`` at first) in which each tensor's sort order is
            remembered by its position, so the next call re-sorts nearly sorted values (see
            :func:`sort_order`); the penalty is the same with or without it.

    Returns:
        0-d tensor, 0 at ``params == anchors``.

    Raises:
        ValueError: if the number or shapes of ``params`` and ``anchors`` differ.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.regularizers import l2_init_penalty, wasserstein_init_penalty
        >>> _ = torch.manual_seed(0)
        >>> model, x, y = nn.Linear(4, 2), torch.randn(8, 4), torch.randn(8, 2)
        >>> theta_0 = [p.detach().clone() for p in model.parameters()]
        >>> task_loss = F.mse_loss(model(x), y)
        >>> loss = task_loss + 1e-2 * wasserstein_init_penalty(model.parameters(), theta_0)
        >>> loss.backward()
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(model.weight.flip(1))  # permute the weights
        >>> wasserstein_init_penalty(model.parameters(), theta_0).item()  # same distribution
        0.0
        >>> bool(l2_init_penalty(model.parameters(), theta_0) > 0)  # but they moved
        True
    """
    params, anchors = _pairs(params, anchors, "wasserstein_init_penalty")
    total = _zero(params)
    for i, (p, a) in enumerate(zip(params, anchors)):
        if p.numel() == 0:
            continue
        target = a.flatten() if anchors_sorted else a.flatten().sort().values
        flat = p.flatten()
        if orders is None:
            ordered = flat.sort().values
        else:
            orders[i] = order = sort_order(flat, orders.get(i))
            ordered = flat[order.to(flat.device)]  # its gradient scatters back through order
        total = total + (ordered - target).square().mean()
    return total


def _spectrum(activation: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues of the smaller Gram matrix of ``activation`` and their exact sum (trace)."""
    if activation.dim() < 1 or activation.shape[0] == 0:
        raise ValueError("second_moment_effective_rank() needs activations of shape (n, ...) with "
                         f"n >= 1 examples, got shape {tuple(activation.shape)}.")
    a = activation.reshape(activation.shape[0], -1)
    if not a.is_floating_point() or a.dtype in (torch.float16, torch.bfloat16):
        a = a.float()  # the result comes back in float32 for half-precision and integer inputs
    if not bool(torch.isfinite(a).all()):
        raise FloatingPointError(
            "the layer inputs contain NaN or inf, so their effective rank is undefined; training "
            "has diverged (lower the learning rate or the regularization coefficient).")
    n, d = a.shape
    # Under autocast the matmul would run in half precision, too coarse for a spectrum.
    with torch.autocast(device_type=a.device.type, enabled=False):
        # E[a a^T] = A^T A / n (d x d) and A A^T / n (n x n) share their nonzero eigenvalues;
        # the smaller one is cheaper and has fewer (numerically noisy) zero eigenvalues. The
        # eigensolver runs in float64: float32 syevd fails to converge on the near-degenerate
        # spectra of layers with many dead units (seen in a 50-task MNIST run).
        a64 = a.double()
        gram = (a64.T @ a64 if d <= n else a64 @ a64.T) / n
        gram = (gram + gram.T) / 2  # exactly symmetric for eigvalsh's backward
        try:
            eigenvalues = torch.linalg.eigvalsh(gram)
        except torch.linalg.LinAlgError:
            # Last resort: the squared singular values of A / sqrt(n) (divide and conquer SVD).
            eigenvalues = torch.linalg.svdvals(a64 / math.sqrt(n)).square().flip(0)
        return eigenvalues.to(a.dtype), gram.diagonal().sum().to(a.dtype)


def _entropy_rank(eigenvalues: Tensor, total: Tensor, eps: float | None) -> Tensor:
    """``exp(H(p))`` with ``p = eigenvalues / total``, stable and differentiable."""
    floor = torch.finfo(eigenvalues.dtype).eps if eps is None else eps
    positive = total > 0
    p = eigenvalues / torch.where(positive, total, 1.0)
    # d(-p log p)/dp = -(log p + 1) is unbounded as p -> 0: values below the floor (numerically
    # zero eigenvalues) are clamped, which also zeroes their gradient. Their contribution to the
    # entropy is at most floor * |log floor| each.
    p = p.clamp_min(floor)
    entropy = -(p * p.log()).sum()
    return torch.where(positive, entropy.exp(), 0.0)


def second_moment_effective_rank(activation: Tensor, eps: float | None = None) -> Tensor:
    """Differentiable effective rank of the second-moment matrix ``E[a a^T]`` of one layer input.

    With ``A`` the ``n x d`` matrix of a layer's inputs over a batch (all non-batch dimensions
    flattened), ``E[a a^T] = A^T A / n``. Its effective rank is ``exp(H(p))`` with
    ``p = lambda / sum(lambda)`` its normalised eigenvalues and ``H`` the Shannon entropy (Roy &
    Vetterli, "The effective rank: A measure of effective dimensionality", EUSIPCO 2007). The
    eigenvalues come from the smaller of ``A^T A / n`` (``d x d``) and the Gram matrix
    ``A A^T / n`` (``n x n``), which have the same nonzero eigenvalues; ``sum(lambda)`` is the
    exact trace. Eigenvalues whose share ``p`` is below ``eps`` are treated as zero (clamped, no
    gradient), which keeps the gradient finite for rank-deficient inputs. All-zero inputs have
    effective rank 0. The second moment is not centred, as in ``E[a a^T]``.

    Args:
        activation: layer inputs of shape ``(n, ...)``; half precision is computed in float32.
        eps: floor on the normalised eigenvalues; default the dtype's machine epsilon.

    Returns:
        0-d tensor between 0 and ``min(n, d)``.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.regularizers import second_moment_effective_rank
        >>> _ = torch.manual_seed(0)
        >>> layer1, x = nn.Linear(8, 16), torch.randn(32, 8)
        >>> h = torch.relu(layer1(x))
        >>> erank = second_moment_effective_rank(h)  # how many directions the batch spans
        >>> bool(1 <= erank <= 16), erank.requires_grad
        (True, True)
        >>> round(float(second_moment_effective_rank(torch.eye(4))), 4)  # 4 equal directions
        4.0
    """
    eigenvalues, total = _spectrum(activation)
    return _entropy_rank(eigenvalues, total, eps)


def effective_rank_penalty(activations: Iterable[Tensor], reduction: LayerReduction = "sum",
                           eps: float | None = None) -> Tensor:
    """Minus the effective rank of the layers' input second moments (adding it raises the rank).

    The layers have different widths, so "the effective rank of the sum over layers of
    ``E[a_l a_l^T]``" needs a definition; ``reduction`` chooses it:

    * ``"sum"`` (default): ``-sum_l erank(E[a_l a_l^T])``, the per-layer effective ranks of
      :func:`second_moment_effective_rank` added up. Every layer counts on its own, regardless of
      the scale of its activations.
    * ``"direct_sum"``: ``-erank(E[a_1 a_1^T] (+) ... (+) E[a_L a_L^T])``, the effective rank of
      the block-diagonal matrix of all layers, i.e. of the pooled eigenvalues of all layers,
      normalised together. Layers with larger activations weigh more.

    Args:
        activations: one tensor of shape ``(n, ...)`` per layer input.
        reduction: ``"sum"`` or ``"direct_sum"``, see above.
        eps: floor on the normalised eigenvalues (see :func:`second_moment_effective_rank`).

    Returns:
        0-d tensor (0 for no activations).

    Raises:
        ValueError: for an unknown ``reduction`` or an activation without examples.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.regularizers import effective_rank_penalty
        >>> _ = torch.manual_seed(0)
        >>> layer1, layer2, head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        >>> x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        >>> h1 = torch.relu(layer1(x))
        >>> h2 = torch.relu(layer2(h1))
        >>> task_loss = F.cross_entropy(head(h2), y)
        >>> loss = task_loss + 1e-2 * effective_rank_penalty([h1, h2])
        >>> loss.backward()
        >>> round(float(effective_rank_penalty([torch.eye(4), torch.eye(2)])), 4)  # -(4 + 2)
        -6.0
    """
    if reduction not in ("sum", "direct_sum"):
        raise ValueError(f"Unknown reduction {reduction!r}. Choose 'sum' or 'direct_sum'.")
    spectra = [_spectrum(a) for a in activations]
    if not spectra:
        return torch.zeros(())
    if reduction == "sum":
        return -torch.stack([_entropy_rank(ev, tr, eps) for ev, tr in spectra]).sum()
    dtype = spectra[0][0].dtype
    for ev, _ in spectra[1:]:
        dtype = torch.promote_types(dtype, ev.dtype)
    eigenvalues = torch.cat([ev.to(dtype) for ev, _ in spectra])
    total = torch.stack([tr.to(dtype) for _, tr in spectra]).sum()
    return -_entropy_rank(eigenvalues, total, eps)


def l2er_penalty(activations: Iterable[Tensor], params: Iterable[Tensor], l2_coef: float,
                 reduction: LayerReduction = "sum", eps: float | None = None) -> Tensor:
    """L2-ER: minus the effective rank of the layer inputs plus ``l2_coef * ||theta||^2``.

    The regularizer of Lewandowski et al.'s tau-trainability poster: keep the features high-rank
    (:func:`effective_rank_penalty`) while L2 (:func:`l2_penalty`) keeps the weights small::

        L2ER = -erank(activations) + l2_coef * ||theta||_2^2

    Args:
        activations: one tensor of shape ``(n, ...)`` per layer input.
        params: parameter tensors for the L2 term.
        l2_coef: weight of the L2 term relative to the effective rank.
        reduction: how layers are combined, see :func:`effective_rank_penalty`.
        eps: floor on the normalised eigenvalues.

    Returns:
        0-d tensor.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_plasticity.regularizers import l2er_penalty
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        >>> h = model[1](model[0](x))  # the input of the last layer
        >>> task_loss = F.cross_entropy(model[2](h), y)
        >>> loss = task_loss + 1e-3 * l2er_penalty([h], model.parameters(), l2_coef=0.1)
        >>> loss.backward()
        >>> penalty = l2er_penalty([torch.eye(4)], [torch.ones(3)], l2_coef=0.1)  # -4 + 0.1 * 3
        >>> round(float(penalty), 4)
        -3.7
    """
    return effective_rank_penalty(activations, reduction, eps) + l2_coef * l2_penalty(params)
