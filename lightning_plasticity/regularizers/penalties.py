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
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

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


#: Signed integer dtype of the same width as each float dtype (its bits give a sort key).
_INT_OF_FLOAT = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
                 torch.float32: torch.int32, torch.float64: torch.int64}
#: Up to this many entries a CPU tensor is argsorted directly by NumPy's stable sort of floats
#: (cheaper than building a key for a few hundred values); above, by a radix sort of its bits.
_DIRECT_SORT_MAX = 1024
#: From this many entries torch's CPU sort of integers can be a radix sort (fbgemm's, in builds
#: with it and OpenMP; ``at::internal::GRAIN_SIZE``); below it, it is a comparison sort.
_TORCH_RADIX_MIN = 32768
#: Per integer dtype, whether torch sorts large keys by radix (timed once per process on the
#: first large key against NumPy's 16-bit radix passes: torch's radix sort takes 0.75x their
#: time on one thread, and less on more; a comparison sort where it has none, 5-10x).
_torch_radix_sorts: dict[torch.dtype, bool] = {}


def _float_sort_key(flat: Tensor) -> Tensor:
    """Signed integers in the order of the floats ``flat`` (1-D, CPU), ``-0.0`` equal to ``0.0``.

    A float's bits read as a signed integer sort like the float for non-negative values and in
    reverse for negative ones; flipping the magnitude bits of the negatives (and adding 1, which
    merges ``-0.0`` into ``0.0``) gives the floats' order. NaNs with the sign bit set come
    first, not last as in ``torch.sort``: :class:`_SortedSquaredDistance` redoes such tensors.
    """
    bits = flat.view(_INT_OF_FLOAT[flat.dtype])
    sign = bits >> (8 * bits.element_size() - 1)  # -1 for negative values, 0 otherwise
    key = sign & torch.iinfo(bits.dtype).max
    key ^= bits
    key -= sign
    return key


def _radix_argsort_numpy(key: Tensor) -> Tensor:
    """Stable argsort of signed integers (CPU) by NumPy's radix sort of their 16-bit words."""
    import numpy as np

    unsigned = (key ^ torch.iinfo(key.dtype).min).numpy()  # unsigned order = signed order
    words = unsigned.view(np.uint16).reshape(key.numel(), -1)
    if sys.byteorder == "big":
        words = words[:, ::-1]
    order = np.argsort(words[:, 0], kind="stable")  # a radix sort for 16-bit integers
    for w in range(1, words.shape[1]):  # least significant word first (LSD)
        order = order[np.argsort(words[:, w][order], kind="stable")]
    return torch.from_numpy(order)


def _radix_argsort(key: Tensor) -> Tensor:
    """Stable argsort of a 1-D CPU tensor of signed integers, by the faster radix sort."""
    if key.numel() < _TORCH_RADIX_MIN:
        return _radix_argsort_numpy(key)
    radix = _torch_radix_sorts.get(key.dtype)
    if radix is None:
        seconds = {}
        for name, sort in (("torch", lambda: torch.sort(key, stable=True).indices),
                           ("numpy", lambda: _radix_argsort_numpy(key))):
            times = []
            for _ in range(3):
                start = time.perf_counter()
                sort()
                times.append(time.perf_counter() - start)
            seconds[name] = min(times)
        # A wide margin: one timing on a busy machine is noisy, the two sorts are far apart.
        radix = _torch_radix_sorts[key.dtype] = seconds["torch"] < 2 * seconds["numpy"]
    if radix:
        return torch.sort(key, stable=True).indices
    return _radix_argsort_numpy(key)


def _sort_indices(flat: Tensor) -> Tensor:
    """The permutation that sorts a 1-D tensor: ``torch.sort(flat, stable=True).indices``.

    The same permutation (ties in index order, ``-0.0`` tied with ``0.0``; only negative NaNs
    differ, see :func:`_float_sort_key`), faster on CPU, where torch sorts floats by comparisons
    (6 ms for the 78,400 first-layer weights of the MNIST MLP, one thread) but their bits as
    integers by a radix sort (0.6 ms). Small tensors are argsorted by NumPy.
    """
    if flat.device.type != "cpu" or flat.dtype not in _INT_OF_FLOAT:
        return torch.sort(flat, stable=True).indices  # CUDA sorts floats by radix already
    if flat.numel() <= _DIRECT_SORT_MAX:
        if flat.dtype is torch.bfloat16:  # NumPy has no bfloat16
            return torch.sort(flat, stable=True).indices
        import numpy as np

        return torch.from_numpy(np.argsort(flat.numpy(), kind="stable"))
    return _radix_argsort(_float_sort_key(flat))


def _placed_targets(flat: Tensor, target: Tensor, exact_nan: bool = False) -> Tensor:
    """``target`` (sorted, 1-D) moved to the entries of ``flat`` that hold each rank.

    ``out[order[k]] = target[k]`` with ``order`` the stable sorting permutation of ``flat``, so
    that ``sum_j (flat_j - out_j) ** 2 = sum_k (sort(flat)_k - target_k) ** 2``.
    """
    if flat.numel() == 1:
        return target
    order = torch.sort(flat, stable=True).indices if exact_nan else _sort_indices(flat)
    return torch.empty_like(flat).scatter_(0, order, target)


def _mean_square(diff: Tensor) -> Tensor:
    if diff.dtype in (torch.float32, torch.float64):
        return diff.dot(diff) / diff.numel()
    return diff.square().mean()  # half precision: accumulated in float32, unlike dot


class _SortedSquaredDistance(torch.autograd.Function):
    """``sum_i mean((sort(p_i) - targets_i) ** 2)``: one fused node instead of a chain per tensor.

    Each tensor is sorted once (:func:`_sort_indices`) and its sorted targets are scattered to
    the entries holding each rank (:func:`_placed_targets`), so the value is the same sum of
    squares in another order and the gradient, ``2 (p - placed) / n``, is what autograd gives
    through ``torch.sort`` (``stable=True``). The backward is differentiable itself (the placed
    targets are constants), so Hessian-vector products through a loss with the penalty work.
    """

    @staticmethod
    def forward(ctx: Any, targets: list[Tensor], *params: Tensor) -> Tensor:  # type: ignore[override]
        total = params[0].new_zeros(())
        placed, diffs = [], []
        for p, target in zip(params, targets):
            flat = p.detach().reshape(-1)
            at = _placed_targets(flat, target)
            diff = flat - at
            term = _mean_square(diff)
            if flat.device.type == "cpu" and torch.isnan(term):
                # A NaN entry: torch sorts every NaN last, the bit key negative NaNs first.
                at = _placed_targets(flat, target, exact_nan=True)
                diff = flat - at
                term = _mean_square(diff)
            total = total + term
            placed.append(at)
            diffs.append(diff)
        ctx.placed, ctx.diffs = placed, diffs
        ctx.shapes = [p.shape for p in params]
        ctx.save_for_backward(*params)  # read only under create_graph=True
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        # Under create_graph=True the gradient is recomputed from the parameters, so that it
        # is differentiable in them (the Hessian is 2 / n times the identity per tensor).
        params = ctx.saved_tensors if torch.is_grad_enabled() else None
        grads: list[Tensor | None] = [None]
        for i, (shape, at, diff) in enumerate(zip(ctx.shapes, ctx.placed, ctx.diffs)):
            if not ctx.needs_input_grad[i + 1]:
                grads.append(None)
                continue
            if params is not None:
                diff = params[i].reshape(-1) - at
            # (grad / n) * 2 * diff: rounded as autograd rounds the chain mean <- square
            scale = grad.to(diff.dtype) / diff.numel() * 2
            grads.append((diff * scale).view(shape))
        return tuple(grads)


def _functorch_wrapped(t: Tensor) -> bool:
    """Whether ``t`` is a tensor of a ``torch.func`` transform (``vmap``, ``grad``, ...)."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


def wasserstein_init_penalty(params: Iterable[Tensor], anchors: Iterable[Tensor],
                             anchors_sorted: bool = False) -> Tensor:
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

    The value and gradient are those of autograd through ``torch.sort`` (``stable=True``: tied
    entries take the tied positions in index order), computed faster: on CPU each tensor is
    sorted by a radix sort of its float bits instead of torch's comparison sort, and the
    gradient is one scatter per tensor instead of autograd's chain through the sort, difference,
    square and mean. It is twice differentiable (Hessian-vector products through it work).

    Args:
        params: parameter tensors.
        anchors: their initial values, in the same order and shapes.
        anchors_sorted: the anchors are already ``anchor.flatten().sort().values`` reshaped to
            the parameter's shape (saves a sort per tensor and call).

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
    kept = [i for i, p in enumerate(params) if p.numel() > 0]
    if not kept:
        return _zero(params)
    if any(_functorch_wrapped(t) for i in kept for t in (params[i], anchors[i])):
        # Inside torch.func transforms (per-example gradients): autograd through torch.sort.
        total = _zero(params)
        for i in kept:
            target = anchors[i].reshape(-1)
            if not anchors_sorted:
                target = target.sort(stable=True).values
            ordered = params[i].reshape(-1).sort(stable=True).values
            total = total + (ordered - target).square().mean()
        return total
    targets = []
    for i in kept:
        flat = anchors[i].reshape(-1)
        targets.append(flat if anchors_sorted else flat.index_select(0, _sort_indices(flat)))
    penalty = _SortedSquaredDistance.apply(targets, *(params[i] for i in kept))
    return penalty if len(kept) == len(params) else _zero(params) + penalty


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
