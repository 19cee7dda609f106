"""Empirical neural tangent kernel (eNTK) of a model on a batch.

For a model ``f(x; theta)`` with ``C`` outputs per example and a batch ``x_1..x_n``, the empirical
NTK (Jacot et al., 2018, "Neural tangent kernel: Convergence and generalization in neural
networks") is the ``(n C) x (n C)`` Gram matrix of the output Jacobian,
``K[(i, c), (j, d)] = <d f_c(x_i) / d theta, d f_d(x_j) / d theta>``, i.e. ``J J^T`` with ``J``
of shape ``(n C, num_params)``. It governs how a gradient step on some examples moves the
outputs on the others; its rank and conditioning, and the size of its off-diagonal entries
relative to the diagonal (interference, generalisation across examples; cf. Achiam et al., 2019,
"Towards characterizing divergence in deep Q-learning"), are tracked as plasticity signals.

Two ways to compute it (Novak et al., 2022, "Fast finite width neural tangent kernel", compare
these and more):

* ``"jacobian"``: ``J`` from ``torch.func.jacrev`` of ``functional_call`` w.r.t. the parameters
  (in chunks bounded by ``max_jacobian_elements``), then ``J J^T``. Works for any module and
  exactly differentiates the batch function, so cross-example coupling (BatchNorm in train
  mode) is included.
* ``"per_layer"``: for a ``Linear`` layer with per-example input ``a_i`` and output gradients
  ``g_ic = d f_c(x_i) / d z_i`` the weight Jacobian is ``g_ic a_i^T``, so its kernel
  contribution is ``(g_ic . g_jd) (a_i . a_j)``, and the bias adds ``g_ic . g_jd``. For a
  ``Conv2d`` (unfolded patches ``a_ip`` and output gradients ``g_icp`` at output pixel ``p``) the
  weight term is ``sum_{p,q} (g_icp . g_jdq)(a_ip . a_jq)`` and the bias term
  ``(sum_p g_icp) . (sum_q g_jdq)``; positions ``p`` likewise cover the leading dimensions of a
  ``Linear`` on ``(n, ..., in)`` inputs and repeated calls of one layer. Per layer either these
  Gram products or the per-example weight Jacobians ``sum_p g_icp a_ip^T`` are formed, whichever
  takes fewer flops. All ``g`` come from ``C`` backward passes of ``sum_i f_c(x_i)``; this yields
  the per-example gradients only if examples do not interact, which excludes BatchNorm in train
  mode (eval-mode BatchNorm is fine).

Layout: ``kernel`` is ``(n C, n C)`` with row ``i * C + c`` for output ``c`` of example ``i``
(``output.reshape(n, -1)`` order; ``kernel.view(n, C, n, C)`` indexes ``[i, c, j, d]``).
``summed_kernel[i, j] = sum_c K[(i, c), (j, c)]`` is the output-summed ``n x n`` kernel, the trace
of the ``C x C`` block of examples ``i, j`` (some works use the mean over outputs, ``1 / C`` times
this, which leaves rank, condition number and interference unchanged). For a linear model
``f(x) = W x`` it is ``C X X^T``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_plasticity.core.batch import usable
from lightning_plasticity.core.isolation import side_effect_free
from lightning_plasticity.core.record import decoupled, hooked
from lightning_plasticity.measures.linear_layers import (
    input_patches,
    is_supported_layer,
    layer_bias,
    output_positions,
)
from lightning_plasticity.measures.parameter_selection import NamedParams, model_parameters
from lightning_plasticity.measures.spectral_stats import condition_number, eps_count

__all__ = ["EmpiricalNTK", "entk"]

ENTKMethod = Literal["auto", "per_layer", "jacobian"]

# Default cap on the number of Jacobian entries (n * C * params) held at once by the jacobian
# method: 2**26 float32 entries are 256 MiB.
DEFAULT_MAX_JACOBIAN_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class EmpiricalNTK:
    """The empirical NTK of a batch and scalar summaries of its output-summed kernel.

    Attributes:
        kernel: ``(n C, n C)``, row ``i * C + c`` (see the module docstring).
        summed_kernel: ``(n, n)``, ``sum_c K[(i, c), (j, c)]``.
        eigenvalues: Eigenvalues of ``summed_kernel``, descending, clamped at 0.
        rank: Number of eigenvalues above ``rtol * max(eigenvalues)``.
        condition_number: ``max / min`` eigenvalue, ``inf`` if ``rank < n``.
        interference: Mean off-diagonal over mean diagonal entry of ``summed_kernel``
            (signed; ``nan`` for ``n = 1``).
        num_outputs: ``C``, outputs per example.
        method: ``"per_layer"`` or ``"jacobian"``, the method actually used.
    """

    kernel: Tensor
    summed_kernel: Tensor
    eigenvalues: Tensor
    rank: int
    condition_number: float
    interference: float
    num_outputs: int
    method: str

    def scalars(self) -> dict[str, float]:
        """The logged keys: ``entk_rank``, ``entk_condition_number``, ``entk_interference``,
        ``entk_top_eigenvalue``, ``entk_trace``."""
        return {
            "entk_rank": float(self.rank),
            "entk_condition_number": float(self.condition_number),
            "entk_interference": float(self.interference),
            "entk_top_eigenvalue": float(self.eigenvalues[0]),
            "entk_trace": float(self.summed_kernel.diagonal().sum()),
        }

    def spectra(self) -> dict[str, Tensor]:
        """1-D spectra for histograms: ``entk_eigenvalues``."""
        return {"entk_eigenvalues": self.eigenvalues}


@dataclass(frozen=True)
class _PlannedLayer:
    module: nn.Module
    use_weight: bool
    use_bias: bool


def _plan_per_layer(
    model: nn.Module, selected: list[tuple[str, nn.Parameter]]
) -> tuple[dict[str, _PlannedLayer], str]:
    """Layers for the per-layer formula, or an empty plan and why it does not apply."""
    selected_ids = {id(p) for _, p in selected}
    owners: dict[int, int] = defaultdict(int)
    plan: dict[str, _PlannedLayer] = {}
    covered: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            return {}, (
                f"{name or 'the model'} is a BatchNorm in train mode, which couples the examples "
                "of the batch (put the model in eval mode for per_layer)"
            )
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] += 1
        if not is_supported_layer(module):
            continue
        weight, bias = module.weight, layer_bias(module)
        use_weight = id(weight) in selected_ids
        use_bias = bias is not None and id(bias) in selected_ids
        if use_weight or use_bias:
            plan[name or "(root)"] = _PlannedLayer(module, use_weight, use_bias)
            covered.update(id(p) for p, used in ((weight, use_weight), (bias, use_bias)) if used)
    missing = [n for n, p in selected if id(p) not in covered]
    if missing:
        return {}, (
            f"parameters {missing} do not belong to a plain Linear/Conv2d (groups=1, no "
            "parametrization)"
        )
    tied = [n for n, p in selected if owners[id(p)] > 1]
    if tied:
        return {}, f"parameters {tied} are shared between modules"
    return plan, ""


def _layer_kernel(
    a: Tensor | None,
    g: Tensor,
    use_weight: bool,
    use_bias: bool,
    strategy: Literal["auto", "gram", "jacobian"] = "auto",
) -> Tensor:
    """One layer's ``(n C, n C)`` kernel from inputs ``a: (n, P, D)``, grads ``g: (n, C, P, O)``."""
    n, C, P, O = g.shape
    kernel = g.new_zeros(n * C, n * C)
    if use_weight:
        assert a is not None
        D = a.shape[-1]
        gram_flops = (n * C * P) ** 2 * (O + 1) + (n * P) ** 2 * D
        jacobian_flops = n * C * P * O * D + (n * C) ** 2 * O * D
        use_gram = strategy == "gram" or (strategy == "auto" and gram_flops <= jacobian_flops)
        if use_gram and P == 1:
            gg = g.reshape(n * C, O) @ g.reshape(n * C, O).T
            aa = a.reshape(n, D) @ a.reshape(n, D).T
            kernel += (gg.view(n, C, n, C) * aa[:, None, :, None]).view(n * C, n * C)
        elif use_gram:
            gf = g.reshape(n * C * P, O)
            gg = (gf @ gf.T).view(n, C, P, n, C, P)
            af = a.reshape(n * P, D)
            aa = (af @ af.T).view(n, P, n, P)
            kernel += torch.einsum("icpjdq,ipjq->icjd", gg, aa).reshape(n * C, n * C)
        else:
            jac = torch.einsum("ncpo,npd->ncod", g, a).reshape(n * C, O * D)
            kernel += jac @ jac.T
    if use_bias:
        gb = g.sum(dim=2).reshape(n * C, O)
        kernel += gb @ gb.T
    return kernel


def _entk_per_layer(
    model: nn.Module, inputs: Tensor, plan: dict[str, _PlannedLayer], seed: int
) -> tuple[Tensor, int] | str:
    """The per-layer kernel and batch size, or why the formula cannot be trusted for this model."""
    acts: dict[str, list[Tensor]] = defaultdict(list)
    outs: dict[str, list[Tensor]] = defaultdict(list)

    def on_forward(name: str, module: nn.Module, x: Tensor, y: Tensor) -> None:
        if plan[name].use_weight:
            acts[name].append(input_patches(module, x))
        outs[name].append(y)

    with side_effect_free(model, seed):
        with hooked({name: p.module for name, p in plan.items()}, decoupled(on_forward)):
            out = model(usable(inputs))
        if not isinstance(out, Tensor):
            raise ValueError(f"the model must return a tensor, got {type(out).__name__}.")
        not_called = [name for name in plan if name not in outs]
        if not_called:
            return f"layers {not_called} are not called as modules in the forward pass"
        n = out.shape[0]
        flat = out.reshape(n, -1)
        C = flat.shape[1]
        names = list(plan)
        ys = [(name, y) for name in names for y in outs[name]]
        # Weights the caller selected although frozen cannot be differentiated by autograd.
        checked = [
            name
            for name in names
            if plan[name].use_weight and plan[name].module.weight.requires_grad
        ]
        # grads[name][c]: list over calls of (n, P, O) output gradients of sum_i f_c(x_i).
        grads: dict[str, list[list[Tensor]]] = {name: [] for name in names}
        weight_grads: list[Tensor | None] = []
        for c in range(C):
            grad_outputs = torch.zeros_like(flat)
            grad_outputs[:, c] = 1
            # With c == 0 also take the true weight gradient, to verify below that the weights
            # enter the output only through these layers' forward calls.
            extra = [plan[name].module.weight for name in checked] if c == 0 else []
            result = torch.autograd.grad(
                flat,
                [y for _, y in ys] + extra,
                grad_outputs=grad_outputs,
                retain_graph=c < C - 1,
                allow_unused=True,
            )
            per_call = result[: len(ys)]
            if c == 0:
                weight_grads = list(result[len(ys) :])
            for name in names:
                grads[name].append([])
            for (name, y), gy in zip(ys, per_call, strict=True):
                gy = torch.zeros_like(y) if gy is None else gy.detach()
                grads[name][c].append(output_positions(plan[name].module, gy))

    kernel = flat.new_zeros(n * C, n * C)
    tol = torch.finfo(flat.dtype).eps ** 0.5
    for name in names:
        layer = plan[name]
        g = torch.stack([torch.cat(calls, dim=1) for calls in grads[name]], dim=1)
        a = torch.cat(acts[name], dim=1) if layer.use_weight else None
        if name in checked:
            expected = weight_grads[checked.index(name)]
            expected = (
                torch.zeros_like(layer.module.weight) if expected is None else expected.detach()
            )
            ours = torch.einsum("npo,npd->od", g[:, 0], a)
            expected = expected.reshape(ours.shape)
            if not torch.allclose(ours, expected, rtol=tol, atol=tol * float(expected.abs().max())):
                return f"the weight of {name} is also used outside its module's forward"
        kernel += _layer_kernel(a, g, layer.use_weight, layer.use_bias)
    return kernel, n


def _entk_jacobian(
    model: nn.Module,
    inputs: Tensor,
    selected: list[tuple[str, nn.Parameter]],
    seed: int,
    max_elements: int,
) -> tuple[Tensor, int]:
    """``J J^T`` and batch size; ``J`` from ``torch.func.jacrev`` in chunks of parameters."""
    from torch.func import functional_call, jacrev

    def fresh_buffers() -> dict[str, Tensor]:
        # Buffers are passed as inputs so that train-mode BatchNorm may update (copies of) its
        # running statistics under jacrev, which rejects mutating captured tensors.
        return {name: b.detach().clone() for name, b in model.named_buffers()}

    with side_effect_free(model, seed), torch.no_grad():
        # Created outside inference mode (lifted by side_effect_free) so that jacrev can use them.
        base = {name: p.detach() for name, p in model.named_parameters()}
        x = usable(inputs)
        out = functional_call(model, (base, fresh_buffers()), (x,))
    if not isinstance(out, Tensor):
        raise ValueError(f"the model must return a tensor, got {type(out).__name__}.")
    rows = out.numel()

    chunks: list[list[tuple[str, nn.Parameter]]] = [[]]
    size = 0
    for name, p in selected:
        if chunks[-1] and rows * (size + p.numel()) > max_elements:
            chunks.append([])
            size = 0
        chunks[-1].append((name, p))
        size += p.numel()

    def f(sub: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
        return functional_call(model, ({**base, **sub}, buffers), (x,)).reshape(-1)

    kernel = out.new_zeros(rows, rows)
    for chunk in chunks:
        # Re-seeding per chunk gives every forward the same dropout masks.
        with side_effect_free(model, seed):
            primals = {name: p.detach() for name, p in chunk}
            jac = jacrev(f, argnums=0)(primals, fresh_buffers())
        for name, _ in chunk:
            j = jac[name].reshape(rows, -1)
            kernel += j @ j.T
    return kernel, out.shape[0]


def entk(
    model: nn.Module,
    inputs: Tensor,
    *,
    method: ENTKMethod = "auto",
    params: NamedParams | None = None,
    rtol: float | None = None,
    seed: int = 0,
    max_jacobian_elements: int = DEFAULT_MAX_JACOBIAN_ELEMENTS,
) -> EmpiricalNTK:
    """Empirical NTK of ``model`` on the batch ``inputs`` and summaries of its summed kernel.

    Definitions, layout and the two methods are in the module docstring. ``"auto"`` uses
    ``"per_layer"`` when every selected parameter is the weight or bias of a plain
    ``Linear``/``Conv2d`` (not shared, ``groups=1``, no parametrization), no BatchNorm is in
    train mode, every such layer is called as a module and its weight gradient reproduces
    autograd's (checked on the first output); otherwise ``"jacobian"``. Both give the same
    kernel where both apply.

    Summaries of ``summed_kernel`` (``n x n``): ``eigenvalues`` (descending, clamped at 0);
    ``rank``, the number of eigenvalues above ``rtol * max`` (default
    ``rtol = n * finfo(dtype).eps``, NumPy's ``matrix_rank`` convention);
    ``condition_number = max / min``, ``inf`` when ``rank < n``; ``interference``, the mean
    off-diagonal entry over the mean diagonal entry, ``(sum K - tr K) / (n (n - 1)) / (tr K / n)``:
    0 when examples' gradients are orthogonal, 1 when all examples share one gradient direction,
    negative for conflicting gradients.

    The model is not modified (parameters, ``.grad``, ``requires_grad``, mode, buffers, hooks
    and the global RNG are as before). In train mode, dropout masks are drawn from a forked
    global RNG seeded with ``seed``, identically for every forward, so that the kernel is that
    of one fixed stochastic network. The cost is one forward and ``C`` backward passes for
    ``"per_layer"``, and about ``n C`` backward passes (vectorised) per parameter chunk for
    ``"jacobian"``.

    Args:
        model: Any ``nn.Module`` mapping ``inputs`` to a tensor ``(n, ...)``; the trailing
            dimensions are flattened to ``C`` outputs per example.
        inputs: A batch of ``n`` inputs (a single tensor passed positionally).
        method: ``"auto"``, ``"per_layer"`` or ``"jacobian"``.
        params: Parameters to differentiate, as from ``select_parameters`` (``(name, param)``
            pairs or bare parameters of ``model``); default: every parameter with
            ``requires_grad``.
        rtol: Relative eigenvalue tolerance for ``rank`` and ``condition_number``.
        seed: Seed of the forked global RNG (dropout in train mode).
        max_jacobian_elements: Cap on ``n * C * (parameters per chunk)`` for ``"jacobian"``.

    Returns:
        An :class:`EmpiricalNTK`; tensors in the model output's dtype and device.

    Raises:
        ValueError: On a bad ``method`` or ``params``, a model that does not return a tensor,
            or ``method="per_layer"`` where it does not apply (the message says why).

    Example::

        >>> import math
        >>> import torch
        >>> from torch import nn
        >>> from lightning_plasticity.measures.entk import entk
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
        >>> x = torch.randn(4, 64)
        >>> ntk = entk(model, x)
        >>> ntk.kernel.shape  # (n C, n C) with n = 4 examples and C = 10 outputs
        torch.Size([40, 40])
        >>> ntk.summed_kernel.shape, ntk.rank, ntk.method
        (torch.Size([4, 4]), 4, 'per_layer')
        >>> math.isfinite(ntk.condition_number), -1 <= ntk.interference <= 1
        (True, True)
    """
    if method not in ("auto", "per_layer", "jacobian"):
        raise ValueError(f"method must be 'auto', 'per_layer' or 'jacobian', got {method!r}.")
    if rtol is not None and rtol < 0:
        raise ValueError(f"rtol must be nonnegative, got {rtol}.")
    selected = model_parameters(model, params)

    kernel: Tensor | None = None
    used = "jacobian"
    if method in ("auto", "per_layer"):
        plan, reason = _plan_per_layer(model, selected)
        if plan:
            result = _entk_per_layer(model, inputs, plan, seed)
            if isinstance(result, str):
                reason = result
            else:
                (kernel, n), used = result, "per_layer"
        if kernel is None and method == "per_layer":
            raise ValueError(
                f"method='per_layer' does not apply: {reason}; use method='jacobian' or 'auto'."
            )
    if kernel is None:
        kernel, n = _entk_jacobian(model, inputs, selected, seed, max_jacobian_elements)

    kernel = (kernel + kernel.T) / 2
    C = kernel.shape[0] // n
    summed = kernel.view(n, C, n, C).diagonal(dim1=1, dim2=3).sum(-1)
    eigenvalues = torch.linalg.eigvalsh(summed).flip(0).clamp_min(0)
    tol = rtol if rtol is not None else n * torch.finfo(eigenvalues.dtype).eps
    trace = summed.diagonal().sum()
    if n > 1:
        interference = float((summed.sum() - trace) / (n * (n - 1)) / (trace / n))
    else:
        interference = float("nan")
    return EmpiricalNTK(
        kernel=kernel.detach(),
        summed_kernel=summed.detach(),
        eigenvalues=eigenvalues.detach(),
        rank=int(eps_count(eigenvalues, tol, relative=True)),
        condition_number=float(condition_number(eigenvalues, tol)),
        interference=interference,
        num_outputs=C,
        method=used,
    )
