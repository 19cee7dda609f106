"""Kronecker-factored (KFAC) approximation of the generalized Gauss-Newton matrix.

For a layer with weight ``W`` of shape ``(out, in)`` (a ``Conv2d`` kernel is reshaped to
``(out, in * kh * kw)``) and bias ``b``, the parameters are arranged as ``theta = [W | b]``
(the bias is the last column) and flattened row-major, so ``theta_flat[o * (in + 1) + i]``. The
layer's block of the generalized Gauss-Newton matrix ``GGN = sum_n J_n^T H_n J_n``
(Schraudolph, 2002; ``H_n`` the Hessian of the loss w.r.t. the model output) is approximated by
``G ⊗ A`` (Martens & Grosse, 2015, "Optimizing neural networks with Kronecker-factored
approximate curvature"; Botev et al., 2017, "Practical Gauss-Newton optimisation for deep
learning" for the exact-loss-Hessian variant) with

* ``A = mean_{n,p} [a_np; 1] [a_np; 1]^T`` (``(in + 1) x (in + 1)``): the uncentred second moment
  of the layer inputs. *Bias augmentation*: a constant 1 is appended to every input so that the
  last row/column of ``A`` covers the bias (``A[-1, -1] == 1``, ``A[:-1, -1]`` is the mean
  input); without a bias, ``A`` is ``in x in``.
* ``G = sum_{n,p} sum_m s_npm s_npm^T`` (``out x out``), where ``s_npm`` is the gradient w.r.t.
  the layer output at example ``n`` and position ``p`` of the ``m``-th column of a square root
  ``S_n`` of ``H_n`` (``S_n S_n^T = H_n``), backpropagated through the network. ``H_n``
  includes the ``1 / N`` of the loss' mean reduction.

``p`` runs over the positions that share the weight: the output pixels of a convolution (the
inputs ``a_np`` are the unfolded patches) and the extra leading dimensions of a ``Linear``
applied to ``(N, ..., in)`` inputs; plain ``(N, in)`` inputs have a single position. Averaging
``A`` and summing ``G`` over positions is "KFAC-expand" (Eschenhagen et al., 2023,
"Kronecker-factored approximate curvature for modern neural network architectures"), which for
convolutions is KFC (Grosse & Martens, 2016, "A Kronecker-factored approximate Fisher matrix for
convolution layers"). For a ``Linear`` layer on ``(N, in)`` inputs ``G ⊗ A`` differs from the exact
GGN block only by the KFAC independence assumption ``E[g g^T ⊗ a a^T] ~ E[g g^T] ⊗ E[a a^T]``.

Modes: ``"exact"`` uses every column of ``S_n`` (KFLR; ``C`` backward passes for ``C`` model
outputs). ``"mc"`` uses ``S_n`` estimated from ``mc_samples`` targets sampled from the model's
predictive distribution (``E[S S^T] = H``; KFAC proper as in Martens & Grosse, 2015), which costs
``mc_samples`` backward passes however many classes there are. The GGN does not depend on the
targets for ``CrossEntropyLoss`` and ``MSELoss``, so neither mode uses them.

Backends: factors are computed by BackPACK (Dangel et al., 2020, "BackPACK: Packing more into
backprop"; extensions ``KFLR`` for ``"exact"`` and ``KFAC`` for ``"mc"``) when the model is an
``nn.Sequential`` of modules BackPACK supports (BackPACK raises ``NotImplementedError`` on any
other module it meets in the backward pass, including ``LayerNorm``, ``BatchNorm``, ``GELU`` and
custom container modules, and cannot follow functional ops between modules), and otherwise by
forward hooks plus ``C`` (or ``mc_samples``) ``torch.autograd.grad`` calls, which works for any
module tree. Both give the same factors in exact mode (tested). BackPACK's own ``Conv2d`` ``G``
sums the backpropagated quantity over positions *before* the outer product, which differs from
KFC by a factor of about the number of output pixels, and BackPACK's ``Linear`` ``A`` has no bias
augmentation; the BackPACK backend therefore takes ``A`` from a forward hook and overrides the
``Conv2d`` extension to sum ``s s^T`` over positions. BackPACK works on a ``copy.deepcopy`` of the
model, so the caller's model never carries BackPACK hooks or attributes.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_plasticity.core.batch import usable
from lightning_plasticity.core.isolation import side_effect_free
from lightning_plasticity.core.layers import ROOT_NAME, get_module
from lightning_plasticity.core.record import decoupled, hooked
from lightning_plasticity.measures.linear_layers import (
    input_patches,
    is_supported_layer,
    layer_bias,
    output_positions,
)
from lightning_plasticity.measures.spectral_stats import effective_rank

__all__ = [
    "KFACEpsRank",
    "KFACFactors",
    "KFACSpectrum",
    "kfac_eps_rank",
    "kfac_factors",
    "kfac_spectrum",
]

#: Averages a tensor across DDP ranks (all_reduce then divide by the world size), or ``None``.
Reduce = Callable[[Tensor], Tensor]
KFACMode = Literal["exact", "mc"]
KFACBackend = Literal["auto", "hooks", "backpack"]

# Rows of the ``G`` eigenvalues processed at once when counting eigenvalue products, bounding the
# memory of the ``(rows, len(A))`` product block.
_COUNT_CHUNK_ELEMENTS = 1 << 22
_ROOT_NAME = ROOT_NAME


@dataclass(frozen=True)
class KFACFactors:
    """Kronecker factors of one layer's GGN block ``G ⊗ A`` (see the module docstring).

    Attributes:
        A: Input second moment, ``(in + 1, in + 1)`` with bias augmentation (last row/column),
            ``(in, in)`` without a bias. For ``Conv2d``, ``in = in_channels * kh * kw``.
        G: Output-gradient second moment, ``(out, out)``.
        has_bias: Whether ``A`` is bias-augmented.
    """

    A: Tensor
    G: Tensor
    has_bias: bool

    @property
    def num_params(self) -> int:
        """Number of parameters the block covers (weight plus bias): ``len(A) * len(G)``."""
        return self.A.shape[0] * self.G.shape[0]


@dataclass(frozen=True)
class KFACSpectrum:
    """Eigenvalues of the block-diagonal KFAC-GGN, overall and per layer (all descending, float64).

    Attributes:
        eigenvalues: All eigenvalues of all layers, length ``sum(num_params)``.
        per_layer: Eigenvalues of ``G ⊗ A`` per layer: every product ``g_i * a_j``.
        A_eigenvalues: Eigenvalues of ``A`` per layer (clamped at 0).
        G_eigenvalues: Eigenvalues of ``G`` per layer (clamped at 0).
    """

    eigenvalues: Tensor
    per_layer: dict[str, Tensor]
    A_eigenvalues: dict[str, Tensor]
    G_eigenvalues: dict[str, Tensor]


@dataclass(frozen=True)
class KFACEpsRank:
    """Eps-rank of the KFAC-GGN and the effective rank of each layer's input features.

    Attributes:
        eps_rank: Number of KFAC-GGN eigenvalues above ``threshold``, all layers together.
        per_layer: The same count per layer.
        num_params: Number of parameters the factors cover (the length of the spectrum).
        per_layer_num_params: The same per layer.
        threshold: The absolute threshold used (``eps``, or ``eps`` times the largest eigenvalue).
        feature_effective_rank: Per layer, the effective rank (Roy & Vetterli, 2007) of the
            eigenvalues of ``A`` without its bias row and column, i.e. of the uncentred second
            moment of the layer's input features.
    """

    eps_rank: int
    per_layer: dict[str, int]
    num_params: int
    per_layer_num_params: dict[str, int]
    threshold: float
    feature_effective_rank: dict[str, float]

    def scalars(self) -> dict[str, float]:
        """The logged keys: ``kfac_eps_rank``, ``kfac_eps_rank_normalized`` (over the parameters
        covered), ``kfac_num_params`` and ``kfac_feature_effective_rank/<layer>``."""
        out = {
            "kfac_eps_rank": float(self.eps_rank),
            "kfac_eps_rank_normalized": self.eps_rank / max(self.num_params, 1),
            "kfac_num_params": float(self.num_params),
        }
        for layer, value in self.feature_effective_rank.items():
            out[f"kfac_feature_effective_rank/{layer}"] = float(value)
        return out


# --------------------------------------------------------------------------------------------
# The layers KFAC covers (the per-layer matrix layout lives in ``linear_layers``).
# --------------------------------------------------------------------------------------------


def _find_layers(model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """Trainable supported layers, and descriptions of trainable modules that are not.

    A supported layer is included when its weight requires grad. Modules owning trainable
    parameters that have no closed form (``LayerNorm``, ``BatchNorm``, ``Embedding``, ...) and a
    supported layer whose weight is tied to an earlier one are reported as skipped.
    """
    layers: dict[str, nn.Module] = {}
    skipped: list[str] = []
    seen_weights: set[int] = set()
    for name, module in model.named_modules():
        direct = [p for p in module._parameters.values() if p is not None]
        if not any(p.requires_grad for p in direct):
            continue
        label = name or _ROOT_NAME
        if is_supported_layer(module) and module.weight.requires_grad:
            if id(module.weight) in seen_weights:
                skipped.append(f"{label} ({type(module).__name__}, tied weight)")
                continue
            seen_weights.add(id(module.weight))
            layers[label] = module
        else:
            skipped.append(f"{label} ({type(module).__name__})")
    return layers, skipped


# --------------------------------------------------------------------------------------------
# Loss Hessian square roots.
# --------------------------------------------------------------------------------------------


def _check_loss(loss_module: nn.Module, targets: Tensor | None) -> None:
    if isinstance(loss_module, nn.CrossEntropyLoss):
        if loss_module.reduction != "mean" or loss_module.weight is not None:
            raise ValueError(
                "KFAC supports nn.CrossEntropyLoss(reduction='mean') without class weights; got "
                f"reduction={loss_module.reduction!r}, weight="
                f"{'set' if loss_module.weight is not None else None}."
            )
        if (
            targets is not None
            and not targets.is_floating_point()
            and bool((targets == loss_module.ignore_index).any())
        ):
            raise ValueError(
                "targets contain ignore_index; KFAC counts every example, so drop those "
                "examples from the batch."
            )
    elif isinstance(loss_module, nn.MSELoss):
        if loss_module.reduction != "mean":
            raise ValueError(
                f"KFAC supports nn.MSELoss(reduction='mean'); got {loss_module.reduction!r}."
            )
    else:
        raise ValueError(
            "loss_module must be nn.CrossEntropyLoss or nn.MSELoss (reduction='mean'), got "
            f"{type(loss_module).__name__}."
        )


def _loss_hessian_sqrt(
    loss_module: nn.Module, output: Tensor, mode: KFACMode, mc_samples: int, seed: int
) -> Tensor:
    """Columns ``S[m]`` (each shaped like ``output``) with ``sum_m S[m]_n S[m]_n^T ~ H_n``.

    Exact for ``mode="exact"``; an unbiased estimate from ``mc_samples`` targets sampled from the
    predictive distribution (explicit generator seeded by ``seed``) for ``mode="mc"``.
    """
    output = output.detach()
    n = output.shape[0]
    generator = torch.Generator(device=output.device).manual_seed(seed)
    if isinstance(loss_module, nn.CrossEntropyLoss):
        if output.dim() != 2:
            raise ValueError(
                f"CrossEntropyLoss KFAC needs (N, C) logits, got shape {tuple(output.shape)}."
            )
        probs = output.softmax(dim=1)
        if mode == "exact":
            # H_n = (diag(p) - p p^T) / N = R R^T with R = (diag(sqrt p) - p sqrt(p)^T) / sqrt(N);
            # S[v, n, c] = R_n[c, v].
            sqrt_p = probs.sqrt()
            eye = torch.eye(output.shape[1], dtype=output.dtype, device=output.device)
            return torch.einsum("nv,nvc->vnc", sqrt_p, eye - probs[:, None, :]) / math.sqrt(n)
        # Gradient of -log p(y|f) at a sampled y is p - onehot(y): E[(p - e_y)(p - e_y)^T] = H_n.
        samples = torch.multinomial(probs, mc_samples, replacement=True, generator=generator)
        onehot = F.one_hot(samples.T, output.shape[1]).to(output.dtype)
        return (probs - onehot) / math.sqrt(n * mc_samples)
    # MSELoss (mean over all N * C' entries): H = 2 / numel * I.
    scale = math.sqrt(2.0 / output.numel())
    per_example = output[0].numel()
    if mode == "exact":
        eye = torch.eye(per_example, dtype=output.dtype, device=output.device)
        cols = eye[:, None, :].expand(per_example, n, per_example)
        return scale * cols.reshape(per_example, *output.shape)
    noise = torch.randn(
        (mc_samples, *output.shape), generator=generator, dtype=output.dtype, device=output.device
    )
    return scale * noise / math.sqrt(mc_samples)


def _own_loss_hessian_sqrt(output: Tensor, loss: Tensor) -> Tensor:
    """Columns ``S[m]`` with ``sum_m S[m]_n S[m]_n^T = H_n``, the Hessian of the model's own
    ``loss`` w.r.t. example ``n``'s ``output``, by double backpropagation.

    ``C`` Hessian-vector products with the loss (cheap: they only traverse the loss's own ops)
    give every example's ``C x C`` block, assuming, as the GGN does for per-example losses, that
    the loss couples no two examples. Each block's symmetric square root is taken from its
    eigendecomposition, negative eigenvalues (a non-convex loss) clamped at 0.
    """
    n = output.shape[0]
    C = output[0].numel()
    (g,) = torch.autograd.grad(loss, output, create_graph=True)
    g = g.reshape(n, C)
    blocks = output.new_zeros(n, C, C)
    for c in range(C):
        (h,) = torch.autograd.grad(g[:, c].sum(), output, retain_graph=True, allow_unused=True)
        if h is not None:
            blocks[:, :, c] = h.detach().reshape(n, C)
    blocks = (blocks + blocks.transpose(1, 2)) / 2
    evals, evecs = torch.linalg.eigh(blocks.to(torch.float64))
    roots = (evecs * evals.clamp_min(0).sqrt()[:, None, :]) @ evecs.transpose(1, 2)
    # S[m]_n = column m of the root of H_n.
    return roots.to(output.dtype).permute(2, 0, 1).reshape(C, *output.shape)


def _accumulation_dtype(t: Tensor) -> Tensor:
    """At least float32: second moments of half-precision activations lose too much."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _default_targets(loss_module: nn.Module, output: Tensor) -> Tensor:
    if isinstance(loss_module, nn.CrossEntropyLoss):
        return torch.zeros(output.shape[0], dtype=torch.long, device=output.device)
    return torch.zeros_like(output)


# --------------------------------------------------------------------------------------------
# Backends.
# --------------------------------------------------------------------------------------------


class _InputMoments:
    """Accumulates bias-augmented ``A`` from forward-hook inputs (the unfold is not kept)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)

    def __call__(self, name: str, module: nn.Module, x: Tensor, _output: Tensor) -> None:
        a = input_patches(module, x)
        a = _accumulation_dtype(a.reshape(-1, a.shape[-1]))
        if layer_bias(module) is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        moment = a.T @ a
        self.sums[name] = self.sums[name] + moment if name in self.sums else moment
        self.counts[name] += a.shape[0]

    def factor(self, name: str) -> Tensor:
        return self.sums[name] / self.counts[name]


def _kfac_hooks(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    loss_module: nn.Module,
    inputs: Tensor,
    mode: KFACMode,
    mc_samples: int,
    seed: int,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Factors from forward hooks (``A``) and one autograd backward per Hessian column (``G``)."""
    if not layers:
        return {}
    moments = _InputMoments()
    outputs: dict[str, list[Tensor]] = defaultdict(list)

    def on_forward(name: str, module: nn.Module, x: Tensor, y: Tensor) -> None:
        moments(name, module, x, y)
        outputs[name].append(y)

    with side_effect_free(model, seed):
        with hooked(layers, decoupled(on_forward)):
            if loss_module is None:
                out, own_loss = model.forward_with_loss(usable(inputs))
            else:
                out = model(usable(inputs))
        if not isinstance(out, Tensor):
            raise ValueError(f"the model must return a tensor, got {type(out).__name__}.")
        if loss_module is None:
            columns = _own_loss_hessian_sqrt(out, own_loss)
        else:
            columns = _loss_hessian_sqrt(loss_module, out, mode, mc_samples, seed)
        fired = [name for name in layers if name in outputs]
        targets = [(name, y) for name in fired for y in outputs[name]]
        dtype = torch.promote_types(out.dtype, torch.float32)
        G = {
            name: out.new_zeros(
                layers[name].weight.shape[0], layers[name].weight.shape[0], dtype=dtype
            )
            for name in fired
        }
        for m in range(columns.shape[0]):
            grads = torch.autograd.grad(
                out,
                [y for _, y in targets],
                grad_outputs=columns[m],
                retain_graph=m < columns.shape[0] - 1,
                allow_unused=True,
            )
            for (name, _), g in zip(targets, grads, strict=True):
                if g is None:  # the layer does not influence the output
                    continue
                g = output_positions(layers[name], g.detach())
                g = _accumulation_dtype(g.reshape(-1, g.shape[-1]))
                G[name] += g.T @ g
    return {name: (moments.factor(name), G[name]) for name in fired}


def _backpack_supported(model: nn.Module) -> bool:
    """Whether BackPACK's KFLR/KFAC can run on ``model`` and agree with the hooks backend.

    BackPACK needs a chain of modules it knows (it dispatches on the exact class and raises on
    anything else, container modules included) with no functional ops in between, which holds
    for (nested) ``nn.Sequential`` of the modules below. In-place activations are excluded since
    BackPACK reads module outputs after the fact.
    """
    allowed = (
        nn.Linear,
        nn.Conv2d,
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.ZeroPad2d,
        nn.Dropout,
        nn.Flatten,
        nn.ReLU,
        nn.Sigmoid,
        nn.Tanh,
        nn.Identity,
    )

    def ok(module: nn.Module) -> bool:
        if type(module) is nn.Sequential:
            return all(ok(child) for child in module.children())
        if type(module) not in allowed or getattr(module, "inplace", False):
            return False
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if not is_supported_layer(module):
                return False
            if isinstance(module, nn.Conv2d) and (
                module.padding_mode != "zeros" or isinstance(module.padding, str)
            ):
                return False
        return True

    return type(model) is nn.Sequential and ok(model)


def _kfac_backpack(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    loss_module: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    mode: KFACMode,
    mc_samples: int,
    seed: int,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Factors with BackPACK on a deep copy of ``model`` (``G``) and a forward hook (``A``)."""
    from backpack import backpack, extend
    from backpack.context import CTX
    from backpack.extensions import KFAC, KFLR
    from backpack.extensions.secondorder.hbp.conv2d import HBPConv2d

    class _ExpandConv2d(HBPConv2d):
        # BackPACK sums the backpropagated square root over output pixels before the outer
        # product; KFC / KFAC-expand sums the outer products over pixels instead.
        def _factor_from_sqrt(self, module: nn.Module, backproped: Tensor) -> Tensor:
            s = backproped.flatten(start_dim=3)  # (columns, N, out, pixels)
            return torch.einsum("mnip,mnjp->ij", s, s)

    with torch.inference_mode(False):  # copies made in inference mode would be unusable
        model_copy = copy.deepcopy(model)
        loss_copy = copy.deepcopy(loss_module)
    copy_layers = {name: get_module(model_copy, name) for name in layers}
    moments = _InputMoments()
    extension = KFLR() if mode == "exact" else KFAC(mc_samples=mc_samples)
    extension.set_module_extension(nn.Conv2d, _ExpandConv2d(), overwrite=True)
    savefield = "kflr" if mode == "exact" else "kfac"
    first_handle = len(CTX.hook_handles)
    try:
        extend(model_copy)
        extend(loss_copy)
        # BackPACK keys its backpropagated quantities by the outputs' storage, so the A hook
        # must not replace module outputs.
        with (
            side_effect_free(model_copy, seed),
            hooked(copy_layers, lambda c: moments(c.name, c.module, c.input, c.output)),
        ):
            out = model_copy(usable(inputs))
            y = targets if targets is not None else _default_targets(loss_module, out)
            loss = loss_copy(out, y)
            with backpack(extension), warnings.catch_warnings():
                # BackPACK needs full backward hooks also on the first layer, whose input does
                # not require grad; PyTorch warns about exactly that.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
        result = {}
        for name, module in copy_layers.items():
            factors = getattr(module.weight, savefield, None)
            if factors is None:  # not reached by the backward pass
                continue
            result[name] = (moments.factor(name), _accumulation_dtype(factors[0].detach()))
        return result
    finally:
        # extend() registers hooks in BackPACK's global context; drop ours so that repeated
        # measurements do not accumulate handles.
        for handle in CTX.hook_handles[first_handle:]:
            handle.remove()
        del CTX.hook_handles[first_handle:]


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def kfac_factors(
    model: nn.Module,
    loss_module: nn.Module | None,
    inputs: Any,
    targets: Tensor | None = None,
    *,
    mode: KFACMode = "exact",
    mc_samples: int = 1,
    backend: KFACBackend = "auto",
    reduce: Reduce | None = None,
    seed: int = 0,
) -> dict[str, KFACFactors]:
    """KFAC factors ``A`` and ``G`` of the GGN for every trainable ``Linear`` and ``Conv2d`` layer.

    Definitions, bias augmentation and the ``Conv2d`` convention (KFC / KFAC-expand) are in the
    module docstring: the GGN block of layer ``l`` with parameters ``[W | b]`` flattened row-major
    is approximated by ``torch.kron(G, A)``. Layers are keyed by their ``named_modules()`` name
    (``"(root)"`` if the model itself is the layer), in registration order.

    Modules owning trainable parameters without a Kronecker closed form (``LayerNorm``,
    ``BatchNorm``, ``Embedding``, ``MultiheadAttention``'s input projection, grouped
    convolutions, parametrized or tied weights, a ``Linear`` the forward never calls) are skipped
    with one warning naming them; gradients still flow through them, so the other layers' ``G``
    account for them. Frozen layers (weight with ``requires_grad=False``) are left out silently.
    ``G`` assumes examples are independent; with ``BatchNorm`` in train mode, backpropagated
    quantities mix examples and ``G`` includes those cross-terms.

    The model is not modified: parameters, ``.grad``, ``requires_grad``, train/eval mode,
    buffers (BatchNorm running statistics) and the global RNG are as before, and every hook is
    removed. Dropout in train mode draws its masks from the global RNG seeded with ``seed``
    inside a forked RNG state.

    Args:
        model: Any ``nn.Module`` mapping ``inputs`` to a tensor of shape ``(N, C)`` (or
            ``(N, ...)`` for ``MSELoss``).
        loss_module: ``nn.CrossEntropyLoss()`` or ``nn.MSELoss()``, ``reduction="mean"``; or
            ``None`` for the model's own loss: then ``model.forward_with_loss(inputs)`` returns
            ``(output, loss)`` (as :class:`~lightning_plasticity.core.record.HeadOutput` does
            for any LightningModule) and ``H_n`` is the Hessian of that loss w.r.t. example
            ``n``'s output, by double backpropagation (``mode="exact"`` only; the hooks
            backend).
        inputs: A batch of ``N`` inputs (any batch structure the model takes).
        targets: The batch's targets. The GGN does not depend on them; they are only checked
            (``ignore_index``) and fed to BackPACK's loss (zeros if ``None``).
        mode: ``"exact"`` (KFLR: exact loss Hessian, ``C`` backward passes) or ``"mc"`` (KFAC:
            ``mc_samples`` targets sampled from the model's predictive distribution).
        mc_samples: Number of sampled targets per example for ``mode="mc"``.
        backend: ``"backpack"``, ``"hooks"``, or ``"auto"`` (BackPACK when
            the model is an ``nn.Sequential`` of modules it supports, hooks otherwise or if
            BackPACK fails).
        reduce: Cross-rank average (DDP). Each rank computes factors on its equal-sized shard;
            averaging ``A`` (a mean over the shard) and ``G`` (a sum over the shard with the
            shard's ``1 / N_rank`` loss normalisation) gives every rank the factors of one
            process on the whole batch. All factors go through ``reduce`` as one flat tensor.
        seed: Seed of the explicit generator for MC sampling and of the forked global RNG.

    Returns:
        ``{layer_name: KFACFactors}``, factors on the model's device in its dtype (at least
        float32: half-precision models accumulate in float32).

    Raises:
        ValueError: On an unsupported loss, bad ``mode``/``backend``/``mc_samples``, a model
            that does not return a tensor, or ``backend="backpack"`` on a model BackPACK cannot
            handle.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_plasticity.measures.kfac import kfac_factors
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
        >>> x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        >>> factors = kfac_factors(model, nn.CrossEntropyLoss(), x, y, mode="exact")
        >>> list(factors)  # the Linear layers, by module name
        ['0', '2']
        >>> f = factors["0"]
        >>> f.A.shape, f.G.shape, f.has_bias  # A: (in + 1) x (in + 1) with the bias
        (torch.Size([9, 9]), torch.Size([4, 4]), True)
        >>> ggn_block = torch.kron(f.G, f.A)  # (4 * 9) x (4 * 9), for [W | b] row-major
        >>> ggn_block.shape, f.num_params
        (torch.Size([36, 36]), 36)
    """
    if mode not in ("exact", "mc"):
        raise ValueError(f"mode must be 'exact' or 'mc', got {mode!r}.")
    if backend not in ("auto", "hooks", "backpack"):
        raise ValueError(f"backend must be 'auto', 'hooks' or 'backpack', got {backend!r}.")
    if mode == "mc" and (not isinstance(mc_samples, int) or mc_samples < 1):
        raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}.")
    if loss_module is None:
        if mode != "exact" or backend == "backpack":
            raise ValueError(
                "the model's own loss (loss_module=None) needs mode='exact' and the hooks "
                "backend: sampling targets ('mc') needs a known likelihood; pass "
                "nn.CrossEntropyLoss() or nn.MSELoss() for mode='mc'."
            )
        if not callable(getattr(model, "forward_with_loss", None)):
            raise ValueError("loss_module=None needs a model with forward_with_loss(inputs) -> "
                             "(output, loss), e.g. core.record.HeadOutput.")
        backend = "hooks"
    else:
        _check_loss(loss_module, targets)

    layers, skipped = _find_layers(model)
    raw: dict[str, tuple[Tensor, Tensor]] | None = None
    use_backpack = backend == "backpack" or (backend == "auto" and _backpack_supported(model))
    if backend == "backpack" and not _backpack_supported(model):
        raise ValueError(
            "backend='backpack' needs an nn.Sequential of modules BackPACK supports (Linear, "
            "Conv2d, ReLU, Sigmoid, Tanh, pooling, Flatten, Dropout, Identity, no in-place "
            "ops); use backend='auto' or 'hooks'."
        )
    if use_backpack and layers:
        try:
            raw = _kfac_backpack(
                model, layers, loss_module, inputs, targets, mode, mc_samples, seed
            )
        except (NotImplementedError, AssertionError, RuntimeError, ValueError):
            # e.g. a Linear on (N, T, D) inputs, which BackPACK's KFLR rejects.
            if backend == "backpack":
                raise
            raw = None
    if raw is None:
        raw = _kfac_hooks(model, layers, loss_module, inputs, mode, mc_samples, seed)

    skipped += [
        f"{name} ({type(layers[name]).__name__}, not called)" for name in layers if name not in raw
    ]
    if skipped:
        warnings.warn(
            "kfac_factors: no Kronecker factors for these modules with trainable parameters "
            f"(not Linear/Conv2d, or not called as modules); skipped: {', '.join(skipped)}.",
            stacklevel=2,
        )

    if reduce is not None and raw:
        flat = torch.cat([t.reshape(-1) for pair in raw.values() for t in pair])
        flat = reduce(flat)
        offset = 0
        reduced: dict[str, tuple[Tensor, Tensor]] = {}
        for name, (A, G) in raw.items():
            A_new = flat[offset : offset + A.numel()].view_as(A)
            offset += A.numel()
            G_new = flat[offset : offset + G.numel()].view_as(G)
            offset += G.numel()
            reduced[name] = (A_new, G_new)
        raw = reduced

    return {
        name: KFACFactors(
            A=A.detach(), G=G.detach(), has_bias=layer_bias(layers[name]) is not None
        )
        for name, (A, G) in raw.items()
    }


def _psd_eigvalsh(matrix: Tensor) -> Tensor:
    """Eigenvalues (descending, float64, clamped at 0) of a symmetric PSD matrix."""
    m = matrix.detach()
    if m.device.type not in ("cpu", "cuda"):
        m = m.cpu()
    m = m.to(torch.float64)
    eig = torch.linalg.eigvalsh((m + m.T) / 2)
    return eig.flip(0).clamp_min(0)


def kfac_spectrum(factors: Mapping[str, KFACFactors]) -> KFACSpectrum:
    """Eigenvalues of the block-diagonal KFAC-GGN from its Kronecker factors.

    The eigenvalues of ``G ⊗ A`` are all products ``g_i * a_j`` of the factors' eigenvalues, and
    those of the block-diagonal matrix over layers are the union over layers, so the spectrum of
    a matrix with ``num_params`` rows costs only the eigendecompositions of the small factors.

    Args:
        factors: Output of :func:`kfac_factors`.

    Returns:
        A :class:`KFACSpectrum`; eigenvalues are float64, descending, clamped at 0.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_plasticity.measures.kfac import kfac_factors, kfac_spectrum
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
        >>> x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        >>> spectrum = kfac_spectrum(kfac_factors(model, nn.CrossEntropyLoss(), x, y))
        >>> top = spectrum.eigenvalues[:10]  # the 10 largest KFAC-GGN eigenvalues
        >>> top.shape, top.dtype, bool((top[:-1] >= top[1:]).all())
        (torch.Size([10]), torch.float64, True)
        >>> len(spectrum.eigenvalues), {k: len(v) for k, v in spectrum.per_layer.items()}
        (51, {'0': 36, '2': 15})
    """
    per_layer: dict[str, Tensor] = {}
    a_eigs: dict[str, Tensor] = {}
    g_eigs: dict[str, Tensor] = {}
    for name, f in factors.items():
        a_eigs[name] = _psd_eigvalsh(f.A)
        g_eigs[name] = _psd_eigvalsh(f.G)
        products = torch.outer(g_eigs[name], a_eigs[name]).flatten()
        per_layer[name] = products.sort(descending=True).values
    if per_layer:
        eigenvalues = torch.cat(list(per_layer.values())).sort(descending=True).values
    else:
        eigenvalues = torch.zeros(0, dtype=torch.float64)
    return KFACSpectrum(
        eigenvalues=eigenvalues, per_layer=per_layer, A_eigenvalues=a_eigs, G_eigenvalues=g_eigs
    )


def _count_products_above(g: Tensor, a: Tensor, threshold: float) -> int:
    """``#{(i, j): g_i * a_j > threshold}`` in row chunks, without materialising all products."""
    rows = max(1, _COUNT_CHUNK_ELEMENTS // max(1, a.numel()))
    count = 0
    for start in range(0, g.numel(), rows):
        block = g[start : start + rows, None] * a[None, :]
        count += int((block > threshold).sum())
    return count


def kfac_eps_rank(
    factors: Mapping[str, KFACFactors], *, eps: float = 1e-6, relative: bool = True
) -> KFACEpsRank:
    """Eps-rank of the KFAC-GGN and the effective rank of each layer's input features.

    The eps-rank is the number of eigenvalues of the block-diagonal KFAC-GGN (all products
    ``g_i * a_j`` of the factors' eigenvalues, see :func:`kfac_spectrum`) strictly above a
    threshold: ``eps`` itself (``relative=False``) or ``eps`` times the largest KFAC-GGN
    eigenvalue over all layers (``relative=True``, the default; the same threshold is used for the
    per-layer counts). It is exact for the KFAC matrix and costs only the factors'
    eigendecompositions. Relative eps is scale-free (the loss scale, the learning-rate-free
    curvature magnitude), absolute eps compares curvature magnitudes across time. Factors are
    accumulated in the model's dtype, so eigenvalues below about ``1e-7`` (float32) relative to
    the largest are round-off.

    ``feature_effective_rank`` is the effective rank ``exp(H(p))`` (Roy & Vetterli, 2007) of the
    eigenvalues of ``A`` restricted to the input features (the bias row/column excluded), a
    per-layer feature-diversity term.

    Args:
        factors: Output of :func:`kfac_factors`.
        eps: Nonnegative threshold.
        relative: Whether ``eps`` is relative to the largest eigenvalue.

    Returns:
        A :class:`KFACEpsRank`.

    Raises:
        ValueError: If ``eps`` is negative.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_plasticity.measures.kfac import kfac_eps_rank, kfac_factors
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
        >>> x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        >>> factors = kfac_factors(model, nn.CrossEntropyLoss(), x, y)
        >>> r = kfac_eps_rank(factors, eps=1e-6, relative=True)
        >>> r.num_params, r.per_layer_num_params
        (51, {'0': 36, '2': 15})
        >>> alive = r.eps_rank / r.num_params  # fraction of curvature directions still alive
        >>> 0 < alive <= 1, sorted(r.feature_effective_rank)
        (True, ['0', '2'])
    """
    if eps < 0:
        raise ValueError(f"eps must be nonnegative, got {eps}.")
    eigs = {name: (_psd_eigvalsh(f.G), _psd_eigvalsh(f.A)) for name, f in factors.items()}
    largest = max((float(g[0] * a[0]) for g, a in eigs.values()), default=0.0)
    threshold = eps * largest if relative else float(eps)
    per_layer = {name: _count_products_above(g, a, threshold) for name, (g, a) in eigs.items()}
    feature_er: dict[str, float] = {}
    for name, f in factors.items():
        feature_eigs = _psd_eigvalsh(f.A[:-1, :-1]) if f.has_bias else eigs[name][1]
        feature_er[name] = float(effective_rank(feature_eigs))
    per_layer_params = {name: f.num_params for name, f in factors.items()}
    return KFACEpsRank(
        eps_rank=sum(per_layer.values()),
        per_layer=per_layer,
        num_params=sum(per_layer_params.values()),
        per_layer_num_params=per_layer_params,
        threshold=threshold,
        feature_effective_rank=feature_er,
    )
