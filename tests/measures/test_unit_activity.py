import math

import pytest
import torch
from torch import nn

from lightning_plasticity.measures.unit_activity import (
    collect_activations,
    reduce_unit_activity_stats,
    unit_activity,
    unit_activity_from_stats,
    unit_activity_stats,
)
from lightning_plasticity.models.activations import CReLU

DT = torch.float64


def _set(layer: nn.Module, weight: list, bias: list) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=DT).reshape(layer.weight.shape))
        layer.bias.copy_(torch.tensor(bias, dtype=DT))


def relu_case() -> tuple[nn.Module, torch.Tensor]:
    """5 ReLU units on inputs in the positive quadrant: 2 dead, 1 tiny, 2 linearized."""
    model = nn.Sequential(nn.Linear(2, 5), nn.ReLU()).to(DT)
    _set(
        model[0],
        [[1, 0], [-1, 0], [0, -1], [1e-3, 0], [1, -1]],
        [0, 0, -0.5, 0, 0],
    )
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 2, generator=g, dtype=DT) + 0.1
    return model, x


def test_dead_dormant_linearized_relu() -> None:
    model, x = relu_case()
    res = unit_activity(model, x, tau=0.0)
    layer = res.layers["1"]
    assert layer.kind == "relu" and layer.num_units == 5 and layer.num_examples == 40
    assert layer.dead.tolist() == [False, True, True, False, False]
    assert layer.num_dead == 2 and layer.dead_fraction == pytest.approx(2 / 5)
    # tau = 0 is exactly "dead" for ReLU.
    assert torch.equal(layer.dormant, layer.dead)
    assert layer.linearized.tolist() == [True, False, False, True, False]
    assert layer.num_saturated == 0 and math.isnan(layer.saturated_fraction)

    # ReDo scores against the formula s_i = E|h_i| / mean_k E|h_k|.
    h = torch.relu(x @ model[0].weight.T + model[0].bias).detach()
    mean_abs = h.abs().mean(0)
    expected = mean_abs / mean_abs.mean()
    torch.testing.assert_close(layer.scores, expected, rtol=1e-12, atol=0)

    res = unit_activity(model, x, tau=0.025)
    dormant = res.layers["1"].dormant
    assert dormant.tolist() == (expected <= 0.025).tolist() == [False, True, True, True, False]
    assert res.num_dormant == 3 and res.dormant_fraction == pytest.approx(3 / 5)
    # The Linear output is reported as a pre-activation only.
    lin = res.layers["0"]
    assert lin.kind == "linear" and lin.num_units == 0 and math.isnan(lin.dead_fraction)
    z = (x @ model[0].weight.T + model[0].bias).detach()
    assert lin.preactivation_mean == pytest.approx(float(z.mean()), rel=1e-12)
    assert lin.preactivation_std == pytest.approx(float(z.std(unbiased=False)), rel=1e-10)
    assert res.layers["1"].preactivation_std == pytest.approx(lin.preactivation_std)
    assert res.layers["1"].activation_mean == pytest.approx(float(h.mean()), rel=1e-12)
    scalars = res.scalars()
    assert scalars["dead_fraction"] == pytest.approx(0.4)
    assert "saturated_fraction" not in scalars and "dead_fraction/1" in scalars


def test_rarely_active() -> None:
    model = nn.Sequential(nn.Linear(1, 3), nn.ReLU()).to(DT)
    _set(model[0], [[1], [1], [1]], [-198.5, -197.5, 0.5])
    x = torch.arange(200, dtype=DT)[:, None]  # 0..199
    layer = unit_activity(model, x).layers["1"]
    torch.testing.assert_close(
        layer.active_fraction, torch.tensor([1 / 200, 2 / 200, 1.0], dtype=DT)
    )
    # strictly fewer than 1 % of the inputs
    assert layer.rare.tolist() == [True, False, False]
    assert layer.dead.tolist() == [False, False, False]
    assert unit_activity(model, x, rare_fraction=0.02).layers["1"].num_rare == 2


def test_tanh_and_sigmoid_saturation() -> None:
    x = torch.linspace(1, 2, 11, dtype=DT)[:, None]
    model = nn.Sequential(nn.Linear(1, 4), nn.Tanh()).to(DT)
    _set(model[0], [[10], [1], [-10], [3]], [0, 0, 0, 0])
    layer = unit_activity(model, x).layers["1"]
    assert layer.saturated.tolist() == [True, False, True, True]  # tanh(3) = 0.99505
    assert math.isnan(layer.dead_fraction) and math.isnan(layer.linearized_fraction)
    strict = unit_activity(model, x, saturation_threshold=0.999).layers["1"]
    assert strict.saturated.tolist() == [True, False, True, False]

    model = nn.Sequential(nn.Linear(1, 3), nn.Sigmoid()).to(DT)
    _set(model[0], [[10], [-10], [0.1]], [0, 0, 0])
    res = unit_activity(model, x)
    assert res.layers["1"].saturated.tolist() == [True, True, False]
    assert res.num_saturated == 2 and res.saturated_fraction == pytest.approx(2 / 3)
    assert math.isnan(res.dead_fraction)  # no ReLU layer


def test_conv_channels_are_units() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU()).to(DT)
    _set(model[0], [1, -1, 1], [0, 0, -1])
    g = torch.Generator().manual_seed(1)
    x = torch.full((6, 1, 3, 3), 0.5, dtype=DT) + 0.1 * torch.rand(6, 1, 3, 3, generator=g)
    x[:, :, 0, 0] = 2.0  # channel 2 is positive at this position only
    res = unit_activity(model, x, tau=0.0)
    layer = res.layers["1"]
    assert layer.num_units == 3
    # active on an input if non-zero at any position
    assert layer.dead.tolist() == [False, True, False]
    torch.testing.assert_close(layer.active_fraction, torch.tensor([1.0, 0.0, 1.0], dtype=DT))
    # linearized: pre-activation positive at every position of every input
    assert layer.linearized.tolist() == [True, False, False]
    h = collect_activations(model, x)["1"]
    mean_abs = h.abs().mean(dim=(2, 3)).mean(0)
    torch.testing.assert_close(layer.scores, mean_abs / mean_abs.mean(), rtol=1e-12, atol=0)


def test_token_sequences_and_crelu() -> None:
    # (n, T, D): units are the last dimension, tokens are positions.
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU()).to(DT)
    _set(model[0], [[1], [-1]], [0, 0])
    x = torch.rand(4, 5, 1, dtype=DT) + 0.1
    assert unit_activity(model, x).layers["1"].dead.tolist() == [False, True]

    model = nn.Sequential(nn.Linear(1, 2), CReLU()).to(DT)
    _set(model[0], [[1], [-1]], [0, 0])
    res = unit_activity(model, torch.rand(8, 1, dtype=DT) + 0.1)
    layer = res.layers["1"]
    # outputs (relu(z0), relu(z1), relu(-z0), relu(-z1)) with z0 > 0 > z1
    assert layer.kind == "crelu" and layer.num_units == 4 and layer.num_pre_units == 2
    assert layer.dead.tolist() == [False, True, True, False]
    assert layer.linearized.tolist() == [True, False]
    assert res.linearized_fraction == pytest.approx(0.5)


def test_two_shards_sum_to_whole_batch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2), nn.Tanh()).to(DT)
    with torch.no_grad():
        model[0].weight[0] = torch.tensor([1.0, 0.0], dtype=DT)
        model[0].bias[0] = 0.0
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 2, generator=g, dtype=DT)
    x[:8, 0] = -x[:8, 0].abs()  # unit 0 is dead on the first shard only
    x[8, 0] = 1.0
    xa, xb = x[:8], x[8:]
    assert unit_activity(model, xa).layers["1"].dead[0]

    captured: list[torch.Tensor] = []
    reduce_unit_activity_stats(unit_activity_stats(model, xb), lambda t: captured.append(t) or t)
    summed = reduce_unit_activity_stats(unit_activity_stats(model, xa), lambda t: t + captured[0])
    whole = unit_activity_stats(model, x)
    assert summed.keys() == whole.keys()
    for name in whole:
        for a, b in zip(summed[name].tensors(), whole[name].tensors()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    res = unit_activity(model, xa, reduce_sum=lambda t: t + captured[0])
    ref = unit_activity(model, x)
    assert not res.layers["1"].dead[0]
    for name in ref.layers:
        for field in ("dead", "dormant", "rare", "linearized", "saturated"):
            assert torch.equal(getattr(res.layers[name], field), getattr(ref.layers[name], field))
        torch.testing.assert_close(res.layers[name].scores, ref.layers[name].scores)
        assert res.layers[name].preactivation_std == pytest.approx(
            ref.layers[name].preactivation_std, rel=1e-10
        )
    assert res.scalars() == pytest.approx(ref.scalars())
    # from_stats on summed stats is the same path
    assert unit_activity_from_stats(summed).dormant_fraction == ref.dormant_fraction


def test_model_untouched_and_filters() -> None:
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 2)
    ).to(DT)
    model.train()
    x = torch.randn(10, 3, dtype=DT)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    res = unit_activity(model, x, layers=["2", "4"])
    assert list(res.layers) == ["2", "4"]
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(not m._forward_hooks for m in model.modules())
    acts = collect_activations(model.eval(), x, layers=["*"])
    assert list(acts) == ["0", "2", "4"]
    with pytest.raises(ValueError, match="matches no recordable module"):
        unit_activity(model, x, layers=["nope*"])
    with pytest.raises(ValueError, match="tau"):
        unit_activity(model, x, tau=-1)


def test_module_called_twice_gets_two_entries() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.act(x) - 1)

    acts = collect_activations(Twice(), torch.randn(3, 2))
    assert list(acts) == ["act", "act#1"]


def test_inplace_activation_sees_its_input() -> None:
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(inplace=True)).to(DT)
    _set(model[0], [[1], [-1]], [0, 0])
    x = torch.rand(6, 1, dtype=DT) + 0.1
    res = unit_activity(model, x)
    z = torch.cat([x, -x], dim=1)
    assert res.layers["1"].preactivation_mean == pytest.approx(float(z.mean()), abs=1e-12)
    assert res.layers["1"].linearized.tolist() == [True, False]
    acts = collect_activations(model, x)
    torch.testing.assert_close(acts["0"], z)  # not overwritten by the in-place ReLU
    assert all(not m._forward_pre_hooks for m in model.modules())
