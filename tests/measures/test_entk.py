"""Empirical NTK against explicit Jacobians J J^T and closed forms (float64)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_plasticity.measures.entk import _layer_kernel, entk

TOL = {"rtol": 1e-10, "atol": 1e-12}


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def explicit_kernel(model: nn.Module, x: Tensor, params: Sequence[Tensor] | None = None) -> Tensor:
    """``J J^T`` with ``J`` built row by row with ``autograd.grad`` (on a copy of the model)."""
    model = copy.deepcopy(model)
    names = {id(p): n for n, p in model.named_parameters()}
    if params is None:
        ps = [p for p in model.parameters() if p.requires_grad]
    else:
        ps = [p for p in model.parameters() if names[id(p)] in set(params)]
    out = model(x).reshape(x.shape[0], -1)
    rows = []
    for i in range(out.shape[0]):
        for c in range(out.shape[1]):
            grads = torch.autograd.grad(out[i, c], ps, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1)
                        for g, p in zip(grads, ps, strict=True)
                    ]
                )
            )
    J = torch.stack(rows)
    return J @ J.T


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))


def cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def layernorm_net() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3))


class Variants(nn.Module):
    """Strided/dilated/'same'/reflect convolutions, a Linear on sequences, a Linear used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding="same", dilation=2, padding_mode="reflect")
        self.seq = nn.Linear(3, 4)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))  # (n, 3, 4, 4)
        h = torch.tanh(self.seq(h.flatten(2).transpose(1, 2)))  # (n, 16, 4)
        h = torch.tanh(self.shared(torch.tanh(self.shared(h.mean(1)))))
        return self.head(h)


def inputs(n: int, shape: tuple[int, ...], seed: int = 3) -> Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


CASES = {
    "mlp": (mlp, (5,), "per_layer"),
    "cnn": (cnn, (2, 5, 5), "per_layer"),
    "layernorm": (layernorm_net, (5,), "jacobian"),
    "variants": (Variants, (2, 7, 7), "per_layer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_explicit_jacobian(case: str) -> None:
    make, shape, auto_method = CASES[case]
    model = make()
    x = inputs(4, shape)
    reference = explicit_kernel(model, x)
    auto = entk(model, x)
    assert auto.method == auto_method
    torch.testing.assert_close(auto.kernel, reference, **TOL)
    jac = entk(model, x, method="jacobian")
    assert jac.method == "jacobian"
    torch.testing.assert_close(jac.kernel, reference, **TOL)
    if auto_method == "per_layer":
        torch.testing.assert_close(entk(model, x, method="per_layer").kernel, reference, **TOL)
    else:
        with pytest.raises(ValueError, match="per_layer' does not apply"):
            entk(model, x, method="per_layer")


def test_jacobian_chunking_does_not_change_the_kernel() -> None:
    model = cnn()
    x = inputs(3, (2, 5, 5))
    whole = entk(model, x, method="jacobian").kernel
    chunked = entk(model, x, method="jacobian", max_jacobian_elements=1).kernel
    torch.testing.assert_close(chunked, whole, **TOL)


@pytest.mark.parametrize("method", ["per_layer", "jacobian"])
def test_linear_model_closed_form(method: str) -> None:
    # f(x) = W x: J_{(i,c), (o,k)} = delta_{co} x_ik, so K = (X X^T) ⊗ I_C and the summed kernel
    # is C X X^T, independent of W.
    torch.manual_seed(4)
    C, d, n = 3, 5, 4
    model = nn.Linear(d, C, bias=False)
    x = inputs(n, (d,))
    result = entk(model, x, method=method)
    gram = x @ x.T
    torch.testing.assert_close(result.kernel, torch.kron(gram, torch.eye(C)), **TOL)
    torch.testing.assert_close(result.summed_kernel, C * gram, **TOL)
    assert result.num_outputs == C


def test_summaries_of_the_summed_kernel() -> None:
    # n = 6 examples in d = 3 dimensions: the summed kernel C X X^T has rank 3.
    torch.manual_seed(5)
    model = nn.Linear(3, 2, bias=False)
    x = inputs(6, (3,))
    result = entk(model, x)
    summed = result.summed_kernel
    kernel4 = result.kernel.view(6, 2, 6, 2)
    torch.testing.assert_close(summed, kernel4[:, 0, :, 0] + kernel4[:, 1, :, 1], **TOL)
    expected = torch.linalg.eigvalsh(2 * x @ x.T).flip(0).clamp_min(0)
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-10, atol=1e-10)
    assert result.rank == 3
    assert result.condition_number == math.inf
    off = (summed.sum() - summed.trace()) / 30
    assert result.interference == pytest.approx((off / (summed.trace() / 6)).item(), rel=1e-12)

    full_rank = entk(model, x[:3])
    eig = full_rank.eigenvalues
    assert full_rank.rank == 3
    assert full_rank.condition_number == pytest.approx((eig[0] / eig[-1]).item(), rel=1e-10)
    assert math.isnan(entk(model, x[:1]).interference)


@pytest.mark.parametrize("positions", [1, 3])
def test_layer_kernel_gram_and_jacobian_strategies_agree(positions: int) -> None:
    g = torch.Generator().manual_seed(6)
    n, C, O, D = 3, 2, 4, 5
    a = torch.randn(n, positions, D, generator=g)
    grads = torch.randn(n, C, positions, O, generator=g)
    gram = _layer_kernel(a, grads, True, True, strategy="gram")
    jac = _layer_kernel(a, grads, True, True, strategy="jacobian")
    torch.testing.assert_close(gram, jac, **TOL)
    # Explicit per-example Jacobians of [W | b].
    jw = torch.einsum("icpo,ipd->icod", grads, a).reshape(n * C, -1)
    jb = grads.sum(2).reshape(n * C, -1)
    J = torch.cat([jw, jb], dim=1)
    torch.testing.assert_close(gram, J @ J.T, **TOL)


@pytest.mark.parametrize("method", ["per_layer", "jacobian"])
def test_parameter_subset(method: str) -> None:
    model = mlp()
    x = inputs(4, (5,))
    names = ["4.weight", "2.bias"]
    selection = [(n, p) for n, p in model.named_parameters() if n in names]
    result = entk(model, x, method=method, params=selection)
    torch.testing.assert_close(result.kernel, explicit_kernel(model, x, names), **TOL)
    bare = entk(model, x, method=method, params=[p for _, p in selection])
    torch.testing.assert_close(bare.kernel, result.kernel, **TOL)


def snapshot(model: nn.Module) -> dict:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "training": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._backward_hooks)) for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def assert_same(before: dict, after: dict) -> None:
    for key in ("requires_grad", "training", "hooks"):
        assert before[key] == after[key], key
    for key in ("params", "grads", "buffers"):
        for u, v in zip(before[key], after[key], strict=True):
            assert (u is None and v is None) or torch.equal(u, v), key
    assert torch.equal(before["rng"], after["rng"])


def test_batchnorm_in_train_mode_uses_the_batch_jacobian_and_restores_stats() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Linear(5, 4), nn.BatchNorm1d(4, affine=False), nn.Tanh(), nn.Linear(4, 3)
    )
    model.train()
    x = inputs(5, (5,))
    before = snapshot(model)
    result = entk(model, x)
    assert result.method == "jacobian"
    assert_same(before, snapshot(model))
    # Cross-example coupling is included: compare with the explicit Jacobian of the batch map.
    torch.testing.assert_close(result.kernel, explicit_kernel(model, x), **TOL)
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        entk(model, x, method="per_layer")
    model.eval()
    evaluated = entk(model, x)
    assert evaluated.method == "per_layer"
    torch.testing.assert_close(evaluated.kernel, explicit_kernel(model, x), **TOL)


class ReusedWeight(nn.Module):
    """``fc.weight`` also enters the output through a functional call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc(x))
        return self.head(torch.tanh(F.linear(h, self.fc.weight)))


def test_weight_used_outside_its_module_falls_back_to_jacobian() -> None:
    torch.manual_seed(8)
    model = ReusedWeight()
    x = inputs(3, (4,))
    result = entk(model, x)
    assert result.method == "jacobian"
    torch.testing.assert_close(result.kernel, explicit_kernel(model, x), **TOL)
    with pytest.raises(ValueError, match="used outside"):
        entk(model, x, method="per_layer")


def test_dropout_masks_are_consistent_and_the_model_is_unchanged() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    x = inputs(4, (5,))
    before = snapshot(model)
    per_layer = entk(model, x, method="per_layer", seed=3)
    jacobian = entk(model, x, method="jacobian", seed=3)
    torch.testing.assert_close(per_layer.kernel, jacobian.kernel, **TOL)
    assert not torch.equal(per_layer.kernel, entk(model, x, seed=4).kernel)
    with torch.inference_mode():
        inferred = entk(model, x, seed=3)
    torch.testing.assert_close(inferred.kernel, per_layer.kernel, **TOL)
    assert_same(before, snapshot(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    assert not torch.equal(model[0].weight, before["params"][0])


@pytest.mark.parametrize("method", ["per_layer", "jacobian"])
def test_inference_mode_and_explicitly_selected_frozen_weight(method: str) -> None:
    model = mlp()
    model[0].requires_grad_(False)
    x = inputs(3, (5,))
    with torch.inference_mode():
        default = entk(model, x, method=method)
        frozen = entk(model, x, method=method, params=list(model.parameters()))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    torch.testing.assert_close(default.kernel, explicit_kernel(model, x, trainable), **TOL)
    model[0].requires_grad_(True)
    torch.testing.assert_close(frozen.kernel, explicit_kernel(model, x), **TOL)


def test_bad_arguments_raise_clear_errors() -> None:
    model = mlp()
    x = inputs(2, (5,))
    with pytest.raises(ValueError, match="method"):
        entk(model, x, method="ntk")
    with pytest.raises(ValueError, match="not a parameter of the model"):
        entk(model, x, params=[nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="no parameters"):
        entk(model, x, params=[])
