"""Bad arguments, and the pure helpers: unit statistics, unit layers, optimizer state."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_plasticity.core.initialization import fresh_initialization
from lightning_plasticity.interventions import (
    ContinualBackprop,
    ReDo,
    ResetLayers,
    ShrinkAndPerturb,
    bias_corrected,
    contribution_utility,
    dormant_scores,
    dormant_units,
    ema_update,
    find_unit_layers,
    lowest_utility_units,
    replacement_count,
    reset_parameter_state,
    reset_state_entries,
    unit_activity,
)
from lightning_plasticity.models import CNN, MLP
from tests.interventions.helpers import WIDTH


@pytest.mark.parametrize(("make", "message"), [
    (lambda: ReDo(tau=-0.1), "tau must be >= 0"),
    (lambda: ReDo(on_task_start=False), "would never act"),
    (lambda: ReDo(every_n_train_steps=0), "every_n_train_steps must be >= 1"),
    (lambda: ReDo(probe_size=0), "probe_size"),
    (lambda: ContinualBackprop(replacement_rate=-1e-4), "replacement_rate must be"),
    (lambda: ContinualBackprop(replacement_rate=math.nan), "replacement_rate must be"),
    (lambda: ContinualBackprop(maturity_threshold=-1), "maturity_threshold must be"),
    (lambda: ContinualBackprop(decay_rate=1.0), r"decay_rate must be in \[0, 1\)"),
    (lambda: ShrinkAndPerturb(alpha=1.5), r"alpha .* must be in \[0, 1\]"),
    (lambda: ShrinkAndPerturb(alpha=-0.1), r"alpha .* must be in \[0, 1\]"),
    (lambda: ShrinkAndPerturb(sigma=-1.0), "sigma .* must be >= 0"),
    (lambda: ShrinkAndPerturb(seed="1"), "seed must be an int"),
    (lambda: ResetLayers(reset_layers=False, reset_optimizer=False), "would do nothing"),
    (lambda: ResetLayers(layers="network.head"), "not a string"),
    (lambda: ResetLayers(layers=["network.head"], reset_layers=False, reset_optimizer=True),
     "only used with reset_layers=True"),
])
def test_bad_arguments_raise_helpful_errors(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


# ------------------------------------------------------------------------------- pure helpers

def test_dormant_scores_follow_sokar_et_al() -> None:
    h = torch.tensor([[1.0, -3.0, 0.0, 0.05], [3.0, 1.0, 0.0, -0.05]])
    a = unit_activity(h)
    assert torch.allclose(a, torch.tensor([2.0, 2.0, 0.0, 0.05]))
    s = dormant_scores(a)
    assert torch.allclose(s, a / a.mean())
    assert dormant_units(a, 0.0).tolist() == [False, False, True, False]
    assert dormant_units(a, 0.025).tolist() == [False, False, True, False]
    assert dormant_units(a, 0.1).tolist() == [False, False, True, True]
    assert dormant_scores(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    # CReLU: a unit is dormant only when both of its copies are.
    assert dormant_units(torch.tensor([0.0, 0.0, 1.0, 0.0]), 0.0, multiplier=2).tolist() == \
        [False, True]
    # Conv feature maps: the mean runs over the batch and the positions.
    conv = torch.zeros(2, 3, 4, 4)
    conv[:, 1] = -2.0
    assert unit_activity(conv, 1).tolist() == [0.0, 2.0, 0.0]


def test_contribution_utility_ema_and_bias_correction_by_hand() -> None:
    decay, values = 0.9, [torch.tensor([1.0, 4.0]), torch.tensor([3.0, 0.0]),
                          torch.tensor([2.0, 2.0])]
    u = torch.zeros(2)
    for v in values:
        u = ema_update(u, v, decay)
    ages = torch.tensor([3, 3])
    hand = sum((1 - decay) * decay ** (3 - j) * values[j - 1] for j in (1, 2, 3))
    assert torch.allclose(u, hand)
    assert torch.allclose(bias_corrected(u, ages, decay), hand / (1 - decay ** 3))
    # A constant value is recovered exactly; age 0 gives 0, not 0/0.
    c = ema_update(ema_update(torch.zeros(1), torch.full((1,), 5.0), 0.99), torch.full((1,), 5.0),
                   0.99)
    assert torch.allclose(bias_corrected(c, torch.tensor([2]), 0.99), torch.tensor([5.0]))
    assert bias_corrected(torch.zeros(1), torch.tensor([0]), 0.99).tolist() == [0.0]
    # |h| times the summed absolute outgoing weights; CReLU copies add up.
    assert contribution_utility(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.5])).tolist() == \
        [3.0, 1.0]
    assert contribution_utility(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.ones(4), 2).tolist() \
        == [4.0, 6.0]


def test_replacement_budget_and_choice() -> None:
    assert replacement_count(0.0, 0.5, 0, 8) == (0, 0.0)  # nothing mature: no budget
    assert replacement_count(0.25, 0.1, 5, 8) == (0, 0.75)
    count, budget = replacement_count(0.75, 0.1, 5, 8)
    assert count == 1 and math.isclose(budget, 0.25)
    assert replacement_count(0.0, 1.0, 8, 8) == (7, 0.0)  # never the whole layer
    assert replacement_count(0.0, 10.0, 3, 8) == (3, 0.0)  # never more than the mature units
    utility = torch.tensor([0.5, 0.1, 0.1, 0.0, 0.3])
    mature = torch.tensor([True, True, True, False, True])
    assert lowest_utility_units(utility, mature, 2).tolist() == [1, 2]
    assert lowest_utility_units(utility, mature, 10).tolist() == [0, 1, 2, 4]


def test_fresh_initialization_is_seeded_and_leaves_the_global_rng_alone() -> None:
    layer = nn.Linear(5, 3)
    before = torch.get_rng_state()
    a, b, c = (fresh_initialization(layer, s) for s in (7, 7, 8))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    assert not torch.equal(a.weight, layer.weight)


def test_find_unit_layers() -> None:
    mlp = find_unit_layers(MLP((1, 8, 8), 10, width=WIDTH, depth=2))
    assert [layer.names for layer in mlp] == [
        ("layers.0.linear", "layers.0.norm", "layers.0.act", "layers.1.linear"),
        ("layers.1.linear", "layers.1.norm", "layers.1.act", "head")]
    cnn = find_unit_layers(CNN((1, 8, 8), 10, channels=(4, 6), hidden=8))
    assert [(layer.name, layer.group) for layer in cnn] == [
        ("blocks.0.conv", 1), ("blocks.1.conv", 4), ("fc.linear", 1)]
    assert cnn[1].outgoing_columns(torch.tensor([2])).tolist() == [8, 9, 10, 11]
    crelu = find_unit_layers(MLP((4,), 2, width=3, depth=1, activation="crelu"))
    assert crelu[0].multiplier == 2
    assert crelu[0].outgoing_columns(torch.tensor([1])).tolist() == [1, 4]
    seq = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.Tanh(), nn.Dropout(), nn.Linear(6, 2))
    assert [layer.names for layer in find_unit_layers(seq)] == [("1", "", "2", "4")]

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return x + self.fc2(self.act(self.fc1(x)))

    with pytest.raises(ValueError, match="Supported automatically.*layers="):
        find_unit_layers(Residual())
    assert find_unit_layers(Residual(), [("fc1", "act", "fc2")])[0].num_units == 4
    with pytest.raises(ValueError, match="no module named"):
        find_unit_layers(Residual(), [("fc1", "relu", "fc2")])
    act = nn.ReLU()
    shared = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4), act, nn.Linear(4, 2))
    with pytest.raises(ValueError, match="shared"):
        find_unit_layers(shared)


def test_optimizer_state_helpers() -> None:
    w = nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.Adam([w])
    w.grad = torch.randn(3, 4)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[w].items()}
    assert reset_state_entries(opt, w, torch.tensor([2]), dim=1) == ["exp_avg", "exp_avg_sq"]
    for key in ("exp_avg", "exp_avg_sq"):
        expected = before[key].clone()
        expected[:, 2] = 0
        assert torch.equal(opt.state[w][key], expected)
    assert torch.equal(opt.state[w]["step"], before["step"])
    assert reset_parameter_state(opt, [w]) == 1 and w not in opt.state
