"""The pure penalty functions against direct computations, in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from lightning_plasticity.measures import effective_rank
from lightning_plasticity.regularizers.penalties import (
    effective_rank_penalty,
    l2_init_penalty,
    l2_penalty,
    l2er_penalty,
    second_moment_effective_rank,
    wasserstein_init_penalty,
)

TOL = dict(rtol=1e-10, atol=1e-12)


def tensors(seed: int, shapes: list[tuple[int, ...]], grad: bool = True) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_(grad) for s in shapes]


SHAPES = [(3, 4), (4,), (2, 3, 2)]


def grads(value: Tensor, params: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(value, params))


def test_l2_value_and_gradient() -> None:
    params = tensors(0, SHAPES)
    value = l2_penalty(params)
    expected = sum(float((p.detach().numpy() ** 2).sum()) for p in params)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    for g, p in zip(grads(value, params), params):
        torch.testing.assert_close(g, 2 * p.detach(), **TOL)
    assert l2_penalty([]).item() == 0.0


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("half", [False, True])
def test_l2_init_value_and_gradient(squared: bool, half: bool) -> None:
    params, anchors = tensors(1, SHAPES), tensors(2, SHAPES, grad=False)
    value = l2_init_penalty(params, anchors, squared=squared, half=half)
    diff = np.concatenate([(p.detach() - a).numpy().ravel() for p, a in zip(params, anchors)])
    dist2 = float(diff @ diff)
    scale = 0.5 if half else 1.0
    expected = scale * (dist2 if squared else np.sqrt(dist2))
    assert value.item() == pytest.approx(expected, rel=1e-12)
    for g, p, a in zip(grads(value, params), params, anchors):
        d = p.detach() - a
        expected_grad = scale * (2 * d if squared else d / np.sqrt(dist2))
        torch.testing.assert_close(g, expected_grad, **TOL)


@pytest.mark.parametrize("squared", [True, False])
def test_l2_init_is_zero_at_init_with_finite_gradient(squared: bool) -> None:
    anchors = tensors(3, SHAPES, grad=False)
    params = [a.clone().requires_grad_(True) for a in anchors]
    value = l2_init_penalty(params, anchors, squared=squared)
    assert value.item() == 0.0
    for g in grads(value, params):
        assert torch.equal(g, torch.zeros_like(g))


def wasserstein_by_assignment(p: np.ndarray, q: np.ndarray) -> tuple[float, np.ndarray]:
    """W_2^2 between two n-point empirical distributions by optimal assignment, and its
    gradient in ``p`` (each point pulled towards its assigned partner)."""
    cost = (p[:, None] - q[None, :]) ** 2
    rows, cols = linear_sum_assignment(cost)
    n = len(p)
    partner = np.empty(n)
    partner[rows] = q[cols]
    return float(cost[rows, cols].sum() / n), 2 * (p - partner) / n


def test_wasserstein_value_and_gradient_match_optimal_transport() -> None:
    params, anchors = tensors(4, SHAPES), tensors(5, SHAPES, grad=False)
    value = wasserstein_init_penalty(params, anchors)
    expected, expected_grads = 0.0, []
    for p, a in zip(params, anchors):
        w, g = wasserstein_by_assignment(p.detach().numpy().ravel(), a.numpy().ravel())
        expected += w
        expected_grads.append(torch.from_numpy(g).reshape(p.shape))
    assert value.item() == pytest.approx(expected, rel=1e-12)
    for g, e in zip(grads(value, params), expected_grads):
        torch.testing.assert_close(g, e, **TOL)
    sorted_anchors = [a.flatten().sort().values.reshape(a.shape) for a in anchors]
    torch.testing.assert_close(
        wasserstein_init_penalty(params, sorted_anchors, anchors_sorted=True), value, **TOL)


def test_wasserstein_is_zero_at_init_and_for_permuted_weights() -> None:
    anchors = tensors(6, SHAPES, grad=False)
    assert wasserstein_init_penalty([a.clone() for a in anchors], anchors).item() == 0.0
    g = torch.Generator().manual_seed(0)
    permuted = [a.flatten()[torch.randperm(a.numel(), generator=g)].reshape(a.shape)
                for a in anchors]
    permuted = [p.requires_grad_(True) for p in permuted]
    value = wasserstein_init_penalty(permuted, anchors)
    assert value.item() == 0.0
    assert all(torch.equal(gr, torch.zeros_like(gr)) for gr in grads(value, permuted))
    # ... whereas L2 Init sees the permutation as a large move.
    assert l2_init_penalty(permuted, anchors).item() > 1.0


def test_mismatched_anchors_are_rejected() -> None:
    params = tensors(7, SHAPES)
    with pytest.raises(ValueError, match="one anchor per parameter"):
        l2_init_penalty(params, params[:2])
    with pytest.raises(ValueError, match="pass the anchors in parameter order"):
        wasserstein_init_penalty(params, list(reversed(params)))


def erank_reference(a: Tensor) -> float:
    """Effective rank of the d x d second moment A^T A / n via NumPy's eigvalsh."""
    x = a.detach().reshape(a.shape[0], -1).numpy()
    eigenvalues = np.clip(np.linalg.eigvalsh(x.T @ x / x.shape[0]), 0, None)
    return float(effective_rank(torch.from_numpy(eigenvalues)))


@pytest.mark.parametrize("shape", [(6, 3), (4, 7), (5, 2, 3)])  # n > d, n < d, conv-like
def test_second_moment_effective_rank_matches_reference(shape: tuple[int, ...]) -> None:
    (a,) = tensors(8, [shape])
    assert second_moment_effective_rank(a).item() == pytest.approx(erank_reference(a), rel=1e-9)


def test_effective_rank_closed_forms_and_degenerate_inputs() -> None:
    eye = torch.eye(4, dtype=torch.float64)
    assert second_moment_effective_rank(eye).item() == pytest.approx(4.0, rel=1e-12)
    rank_one = torch.ones(5, 3, dtype=torch.float64, requires_grad=True)
    value = second_moment_effective_rank(rank_one)
    assert value.item() == pytest.approx(1.0, rel=1e-9)
    (g,) = grads(value, [rank_one])
    assert torch.isfinite(g).all()
    zeros = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    value = second_moment_effective_rank(zeros)
    assert value.item() == 0.0
    (g,) = grads(value, [zeros])
    assert torch.equal(g, torch.zeros_like(g))


def test_effective_rank_of_mostly_dead_float32_layer_is_finite() -> None:
    # A ReLU layer after loss of plasticity: most units dead (exactly zero columns), the live
    # ones nearly collinear. The spectrum is degenerate; value and gradient must stay finite.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(256, 1, generator=g)
    live = base + 1e-6 * torch.randn(256, 12, generator=g)
    a = torch.cat([live.relu() * 1e3, torch.zeros(256, 116)], dim=1).requires_grad_(True)
    value = second_moment_effective_rank(a)
    (grad,) = grads(value, [a])
    assert value.dtype == torch.float32
    assert 1.0 <= value.item() < 2.0
    assert torch.isfinite(grad).all()
    reference = effective_rank(torch.linalg.svdvals(a.detach().double()).square())
    # The float32 floor on p (machine epsilon) adds at most eps * |log eps| per clamped value.
    assert value.item() == pytest.approx(float(reference), rel=1e-3)


def test_effective_rank_of_non_finite_inputs_says_training_diverged() -> None:
    a = torch.ones(8, 3)
    a[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="diverged"):
        effective_rank_penalty([a])


def test_effective_rank_penalty_reductions() -> None:
    acts = tensors(9, [(6, 3), (6, 8)])
    expected_sum = -sum(erank_reference(a) for a in acts)
    assert effective_rank_penalty(acts).item() == pytest.approx(expected_sum, rel=1e-9)
    # direct_sum: effective rank of the block-diagonal matrix of the layers' second moments.
    blocks = [a.detach().T @ a.detach() / a.shape[0] for a in acts]
    pooled = torch.linalg.eigvalsh(torch.block_diag(*blocks)).clamp_min(0)
    expected_direct = -effective_rank(pooled).item()
    value = effective_rank_penalty(acts, reduction="direct_sum")
    assert value.item() == pytest.approx(expected_direct, rel=1e-9)
    assert effective_rank_penalty([]).item() == 0.0
    with pytest.raises(ValueError, match="Choose 'sum' or 'direct_sum'"):
        effective_rank_penalty(acts, reduction="mean")  # type: ignore[arg-type]


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 5), nn.Linear(5, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        h1 = torch.tanh(self.fc1(x))
        h2 = torch.tanh(self.fc2(h1))
        return self.fc3(h2), [h1, h2]


@pytest.mark.parametrize("reduction", ["sum", "direct_sum"])
def test_l2er_gradient_matches_finite_differences(reduction: str) -> None:
    torch.manual_seed(0)
    net = TinyNet().double()
    x = torch.randn(7, 3, dtype=torch.float64)
    params = list(net.parameters())

    def value() -> Tensor:
        _, acts = net(x)
        return l2er_penalty(acts, params, l2_coef=0.3, reduction=reduction)  # type: ignore

    analytic = torch.cat([g.flatten() for g in grads(value(), params)])
    numeric, h = [], 1e-6
    with torch.no_grad():
        for p in params:
            flat = p.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + h
                up = value().item()
                flat[i] = old - h
                down = value().item()
                flat[i] = old
                numeric.append((up - down) / (2 * h))
    torch.testing.assert_close(analytic, torch.tensor(numeric, dtype=torch.float64),
                               rtol=1e-6, atol=1e-8)
    _, acts = net(x)
    expected = (effective_rank_penalty(acts, reduction) + 0.3 * l2_penalty(params))  # type: ignore
    torch.testing.assert_close(value(), expected, **TOL)
