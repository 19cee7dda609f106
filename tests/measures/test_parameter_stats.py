import math

import pytest
import torch
from torch import nn

from lightning_plasticity.measures.parameter_stats import (
    parameter_stat_sums,
    parameter_stats,
    parameter_stats_from_sums,
    snapshot_parameters,
)

DT = torch.float64


def matrix_with_singular_values(
    s: list[float], rows: int, cols: int, seed: int = 0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=DT))
    V, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=g, dtype=DT))
    return U @ torch.diag(torch.tensor(s, dtype=DT)) @ V.T


def test_shift_and_permutation_wasserstein() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 4).to(DT)
    init = snapshot_parameters(model)
    c = -0.3
    with torch.no_grad():
        model.weight.add_(c)  # theta = theta_0 + c
        perm = torch.randperm(4)
        model.bias.copy_(init["bias"][perm])  # a permutation of theta_0
    assert not torch.equal(model.bias, init["bias"])
    w1 = parameter_stats(model, init)
    w2 = parameter_stats(model, init, wasserstein_p=2)
    weight, bias = w1.tensors["weight"], w1.tensors["bias"]
    assert weight.wasserstein == pytest.approx(abs(c), rel=1e-12)
    assert w2.tensors["weight"].wasserstein == pytest.approx(abs(c), rel=1e-12)
    assert weight.distance_from_init == pytest.approx(abs(c) * math.sqrt(20), rel=1e-12)
    assert bias.wasserstein == 0.0
    assert bias.distance_from_init > 0
    expected = float((model.bias.detach() - init["bias"]).norm())
    assert bias.distance_from_init == pytest.approx(expected)
    # pooled: (sum of per-tensor |sort diff|) / numel
    assert w1.layers["(root)"].wasserstein == pytest.approx(20 * abs(c) / 24, rel=1e-12)
    assert w1.total.distance_from_init == pytest.approx(
        math.hypot(weight.distance_from_init, bias.distance_from_init), rel=1e-12
    )


def test_wasserstein_closed_form() -> None:
    theta0 = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=DT)
    theta = torch.zeros(2, 2, dtype=DT)
    p = nn.Parameter(theta)
    init = {"w": theta0.reshape(2, 2)}
    s1 = parameter_stats_from_sums(parameter_stat_sums([("w", p)], init))
    assert s1.tensors["w"].wasserstein == pytest.approx(1.5)
    s2 = parameter_stats_from_sums(
        parameter_stat_sums([("w", p)], init, wasserstein_p=2), wasserstein_p=2
    )
    assert s2.tensors["w"].wasserstein == pytest.approx(math.sqrt(3.5))


def test_norms_stable_rank_update_and_grad() -> None:
    model = nn.Sequential(nn.Linear(6, 3), nn.Conv2d(3, 3, 2)).to(DT)
    with torch.no_grad():
        model[0].weight.copy_(matrix_with_singular_values([3.0, 2.0, 1.0], 3, 6))
        kernel = matrix_with_singular_values([2.0, 2.0, 1.0], 3, 12, seed=1)
        model[1].weight.copy_(kernel.reshape(3, 3, 2, 2))
    previous = snapshot_parameters(model, device="cpu")
    with torch.no_grad():
        model[0].bias.add_(torch.tensor([0.0, 3.0, 4.0], dtype=DT))
    model[0].weight.grad = torch.full_like(model[0].weight, 0.5)

    stats = parameter_stats(model, previous=previous)
    w = stats.tensors["0.weight"]
    assert w.stable_rank == pytest.approx(14 / 9, rel=1e-10)
    assert stats.tensors["1.weight"].stable_rank == pytest.approx(9 / 4, rel=1e-10)
    assert math.isnan(stats.tensors["0.bias"].stable_rank)
    assert w.norm == pytest.approx(math.sqrt(14), rel=1e-10)
    assert w.mean_abs == pytest.approx(float(model[0].weight.detach().abs().mean()), rel=1e-12)
    assert stats.tensors["0.bias"].update_norm == pytest.approx(5.0)
    assert w.update_norm == 0.0
    assert stats.total.update_norm == pytest.approx(5.0)
    assert w.grad_norm == pytest.approx(0.5 * math.sqrt(18))
    assert math.isnan(stats.tensors["0.bias"].grad_norm)
    assert stats.layers["0"].grad_norm == pytest.approx(w.grad_norm)
    assert stats.total.stable_rank == pytest.approx((14 / 9 + 9 / 4) / 2, rel=1e-10)
    layer0 = stats.layers["0"]
    flat = torch.cat([model[0].weight.flatten(), model[0].bias.flatten()]).detach()
    assert layer0.norm == pytest.approx(float(flat.norm()), rel=1e-12)
    assert math.isnan(stats.total.distance_from_init)  # no init snapshot
    scalars = stats.scalars()
    assert "update_norm/0" in scalars and "wasserstein" not in scalars


def test_bad_snapshot_and_no_side_effects() -> None:
    model = nn.Linear(3, 2)
    init = snapshot_parameters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    parameter_stats(model, init, init)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="no entry 'bias'"):
        parameter_stats(model, {"weight": init["weight"]})
    with pytest.raises(ValueError, match="shape"):
        parameter_stats(model, {"weight": init["weight"].T, "bias": init["bias"]})
