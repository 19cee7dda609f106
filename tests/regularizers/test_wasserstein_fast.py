"""The fast Wasserstein init penalty against autograd through ``torch.sort``, in float64.

``wasserstein_init_penalty`` sorts by a radix sort of the float bits and backpropagates through
one fused node; these tests pin its value and gradient to the naive definition, including ties,
signed zeros, NaN, size-1, non-contiguous and large tensors (every sort path), repeated calls,
second derivatives and ``torch.func``.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import pytest
import torch
from torch import Tensor

from lightning_plasticity.models import MLP
from lightning_plasticity.regularizers import L2InitWassersteinClassifier
from lightning_plasticity.regularizers import penalties as pen
from lightning_plasticity.regularizers.penalties import wasserstein_init_penalty

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Sizes that take each sort path: NumPy's argsort of floats (<= 1024), NumPy's 16-bit radix
# passes (< 32768) and torch's integer sort (>= 32768).
SIZES = [2, 7, 1024, 1025, 3000, 32768, 40000]


def reference(params: list[Tensor], anchors: list[Tensor]) -> Tensor:
    """The definition, differentiated by autograd through a stable ``torch.sort``."""
    total = params[0].new_zeros(())
    for p, a in zip(params, anchors):
        ordered = p.flatten().sort(stable=True).values
        total = total + (ordered - a.flatten().sort(stable=True).values).square().mean()
    return total


def value_and_grads(fn, params: list[Tensor], anchors: list[Tensor]  # noqa: ANN001
                    ) -> tuple[Tensor, tuple[Tensor, ...]]:
    value = fn(params, anchors)
    return value.detach(), torch.autograd.grad(value, params)


def with_ties(n: int, g: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    """Values with many exact ties, both signed zeros and both signs."""
    levels = torch.tensor([-1.5, -0.25, -0.0, 0.0, 0.25, 1.5, 3.0], dtype=dtype)
    return levels[torch.randint(len(levels), (n,), generator=g)]


@pytest.fixture(params=["torch radix", "numpy radix"])
def radix(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run large sorts by torch's integer sort and by NumPy's 16-bit radix passes."""
    saved = dict(pen._torch_radix_sorts)
    use_torch = request.param == "torch radix"
    for dtype in (torch.int16, torch.int32, torch.int64):
        pen._torch_radix_sorts[dtype] = use_torch
    yield request.param
    pen._torch_radix_sorts.clear()
    pen._torch_radix_sorts.update(saved)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", SIZES)
def test_sort_indices_is_the_stable_torch_sort(dtype: torch.dtype, n: int, radix: str) -> None:
    g = torch.Generator().manual_seed(n)
    for values in (torch.randn(n, generator=g, dtype=torch.float64).to(dtype) / 30,
                   with_ties(n, g, dtype)):
        assert torch.equal(pen._sort_indices(values), values.sort(stable=True).indices)


def test_value_and_gradient_equal_autograd_through_sort(radix: str) -> None:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 150, generator=g, dtype=torch.float64) / 30  # 45,000: torch radix
    params = [
        big.clone(),
        torch.randn(60, 50, generator=g, dtype=torch.float64),  # NumPy 16-bit radix passes
        torch.randn(7, generator=g, dtype=torch.float64),  # NumPy argsort of floats
        torch.randn(1, generator=g, dtype=torch.float64),  # size 1: no sort
        with_ties(2000, g).reshape(40, 50),  # ties, -0.0 and 0.0
        with_ties(20, g),
    ]
    anchors = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    anchors[4] = with_ties(2000, g).reshape(40, 50)  # tied anchors too
    params = [p.requires_grad_(True) for p in params]
    value, grads = value_and_grads(wasserstein_init_penalty, params, anchors)
    want, want_grads = value_and_grads(reference, params, anchors)
    torch.testing.assert_close(value, want, rtol=1e-12, atol=1e-14)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-15)
    # torch.sort's default (unstable) order may give tied entries each other's targets: the
    # same subgradient up to a permutation within the ties.
    unstable = torch.autograd.grad(sum((p.flatten().sort().values
                                        - a.flatten().sort().values).square().mean()
                                       for p, a in zip(params, anchors)), params)
    for got, exp in zip(grads, unstable):
        torch.testing.assert_close(got.flatten().sort().values, exp.flatten().sort().values,
                                   rtol=1e-12, atol=1e-15)
    # an empty tensor contributes 0
    empty = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(
        wasserstein_init_penalty([empty, *params], [empty.detach(), *anchors]).detach(), value,
        rtol=0, atol=0)


def test_non_contiguous_parameters() -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(250, 300, generator=g, dtype=torch.float64, requires_grad=True)
    small = torch.randn(40, 30, generator=g, dtype=torch.float64, requires_grad=True)
    params = [base.t(), small[:, ::2], base[::7, 1:]]  # views: transposed, strided, sliced
    assert not any(p.is_contiguous() for p in params)
    anchors = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    value = wasserstein_init_penalty(params, anchors)
    got = torch.autograd.grad(value, [base, small])
    want_value = reference(params, anchors)
    want = torch.autograd.grad(want_value, [base, small])
    torch.testing.assert_close(value, want_value, rtol=1e-12, atol=1e-14)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_repeated_calls_follow_the_parameters() -> None:
    # Nothing is cached between calls: each step's value and gradient are the current ones.
    g = torch.Generator().manual_seed(2)
    anchors = [torch.randn(s, generator=g, dtype=torch.float64) for s in [(200, 200), (50,)]]
    params = [a.clone().requires_grad_(True) for a in anchors]
    assert wasserstein_init_penalty(params, anchors).item() == 0.0
    sorted_anchors = [a.flatten().sort().values.reshape(a.shape) for a in anchors]
    for _ in range(4):
        with torch.no_grad():
            for p in params:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        first = value_and_grads(wasserstein_init_penalty, params, anchors)
        second = value_and_grads(partial(wasserstein_init_penalty, anchors_sorted=True),
                                 params, sorted_anchors)
        want = value_and_grads(reference, params, anchors)
        for got in (first, second):
            torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
            for a, b in zip(got[1], want[1]):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", FLOATS)
def test_half_and_single_precision_match_the_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    params = [(torch.randn(s, generator=g) / 30).to(dtype).requires_grad_(True)
              for s in [(100, 400), (100, 30), (10,)]]
    anchors = [(torch.randn(p.shape, generator=g) / 30).to(dtype) for p in params]
    value, grads = value_and_grads(wasserstein_init_penalty, params, anchors)
    want, want_grads = value_and_grads(reference, params, anchors)
    assert value.dtype == dtype
    # the same terms summed in another order; the gradient is elementwise, hence identical
    torch.testing.assert_close(value, want, rtol=1e-2 if dtype.itemsize == 2 else 1e-6, atol=0)
    for got, exp in zip(grads, want_grads):
        assert torch.equal(got, exp)


def test_nan_entries_sort_last_like_torch() -> None:
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    p = torch.linspace(-1, 1, 3000, dtype=torch.float64)
    p[[5, 17]] = -nan  # the sign bit set: first by the bit key, last by torch.sort
    p[40] = nan
    p.requires_grad_(True)
    a = torch.linspace(-2, 2, 3000, dtype=torch.float64)
    value, (grad,) = value_and_grads(wasserstein_init_penalty, [p], [a])
    _, (want,) = value_and_grads(reference, [p], [a])
    assert value.isnan()
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-15, equal_nan=True)


def test_hessian_vector_products_through_the_penalty() -> None:
    # HessianRankCallback differentiates the module's loss twice: the penalty's Hessian is
    # 2 / n times the identity per tensor (the sort order is locally constant).
    g = torch.Generator().manual_seed(4)
    params = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
              for s in [(200, 200), (30,), (1,)]]
    anchors = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    vectors = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    first = torch.autograd.grad(wasserstein_init_penalty(params, anchors), params,
                                create_graph=True)
    hv = torch.autograd.grad(first, params, vectors)
    ref_first = torch.autograd.grad(reference(params, anchors), params, create_graph=True)
    ref_hv = torch.autograd.grad(ref_first, params, vectors)
    for got, want, v, p in zip(hv, ref_hv, vectors, params):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(got, 2 * v / p.numel(), rtol=1e-12, atol=1e-15)
    # batched over vectors (HessianVectorProduct's vmapped double backward)
    first = torch.autograd.grad(wasserstein_init_penalty(params, anchors), params,
                                create_graph=True)
    block = [torch.stack([v, 2 * v]) for v in vectors]
    hv_block = torch.autograd.grad(first, params, block, is_grads_batched=True)
    for got, v, p in zip(hv_block, vectors, params):
        torch.testing.assert_close(got, torch.stack([v, 2 * v]) * 2 / p.numel(),
                                   rtol=1e-12, atol=1e-15)


def test_torch_func_per_example_gradients() -> None:
    from torch.func import grad, vmap

    g = torch.Generator().manual_seed(5)
    batch = torch.randn(4, 50, generator=g, dtype=torch.float64)
    anchor = torch.randn(50, generator=g, dtype=torch.float64)
    got = vmap(grad(lambda p: wasserstein_init_penalty([p], [anchor])))(batch)
    for row, got_row in zip(batch, got):
        p = row.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(reference([p], [anchor]), [p])
        torch.testing.assert_close(got_row, want, rtol=1e-12, atol=1e-15)


def test_no_grad_and_frozen_parameters() -> None:
    g = torch.Generator().manual_seed(6)
    frozen = torch.randn(40, 40, generator=g, dtype=torch.float64)
    trained = torch.randn(40, 40, generator=g, dtype=torch.float64, requires_grad=True)
    anchors = [torch.randn(40, 40, generator=g, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():
        logged = wasserstein_init_penalty([frozen, trained], anchors)
    value = wasserstein_init_penalty([frozen, trained], anchors)
    assert not logged.requires_grad and value.requires_grad
    torch.testing.assert_close(logged, value.detach(), rtol=0, atol=0)
    (got,) = torch.autograd.grad(value, [trained])
    (want,) = torch.autograd.grad(reference([frozen, trained], anchors), [trained])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_mixin_distance_over_steps_matches_the_definition() -> None:
    # The mixin caches the sorted anchors, never the parameters' order: after every update its
    # distance and gradient are those of the definition at the current parameters.
    torch.manual_seed(0)
    model = L2InitWassersteinClassifier(network=partial(MLP, width=200), input_shape=(300,),
                                        num_outputs=3, l2_init_coef=0.0,
                                        wasserstein_coef=1.0).double()
    model._ensure_init_anchor()
    theta0 = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    assert max(p.numel() for p in params) >= pen._TORCH_RADIX_MIN  # the 300 x 200 layer
    assert model.wasserstein_init_distance().item() == 0.0
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        got = value_and_grads(lambda ps, _: model.wasserstein_init_distance(), params, theta0)
        want = value_and_grads(reference, params, theta0)
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
        for a, b in zip(got[1], want[1]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
