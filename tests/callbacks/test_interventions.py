"""Interventions: ShrinkAndPerturb, ResetLayers, ReDo, ContinualBackprop and their pure helpers.

Each intervention must touch exactly the parameters and optimizer state it should: the tests
rebuild the expected tensors independently from snapshots taken right before the intervention
and compare bit for bit.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

from lightning_plasticity.callbacks.continual_backprop import ContinualBackprop
from lightning_plasticity.callbacks.optimizer_state import (
    reset_parameter_state,
    reset_state_entries,
)
from lightning_plasticity.callbacks.redo import ReDo
from lightning_plasticity.callbacks.reset_layers import ResetLayers
from lightning_plasticity.callbacks.shrink_and_perturb import ShrinkAndPerturb, shrink_perturb
from lightning_plasticity.data import ContinualDataModule
from lightning_plasticity.measures.unit_utility import (
    bias_corrected,
    contribution_utility,
    dormant_scores,
    dormant_units,
    ema_update,
    find_unit_layers,
    fresh_initialization,
    lowest_utility_units,
    replacement_count,
    unit_activity,
)
from lightning_plasticity.models import CNN, MLP, ContinualClassifier
from tests.data.helpers import fast_trainer

WIDTH = 16


def stream() -> ContinualDataModule:
    return ContinualDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=5,
                               batch_size=16)


def classifier() -> ContinualClassifier:
    return ContinualClassifier(network=functools.partial(MLP, width=WIDTH), lr=0.01)


def fit(callbacks: list[pl.Callback], model: ContinualClassifier | None = None,
        **kwargs: Any) -> ContinualClassifier:
    pl.seed_everything(0)
    model = model if model is not None else classifier()
    fast_trainer(callbacks=callbacks, limit_val_batches=0, **kwargs).fit(model,
                                                                         datamodule=stream())
    return model


def snapshot(pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Parameters and optimizer state (by parameter name), cloned."""
    params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
    state = {n: {k: v.clone() for k, v in optimizer.state[p].items() if isinstance(v, Tensor)}
             for n, p in pl_module.named_parameters() if p in optimizer.state}
    return {"params": params, "state": state}


class Snapshot(pl.Callback):
    """Snapshots parameters, optimizer state and the CPU RNG state at a task start or step."""

    def __init__(self, task: int | None = None, step: int | None = None) -> None:
        self.task, self.step = task, step
        self.taken: dict[str, Any] | None = None

    def take(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.taken = snapshot(pl_module, trainer.optimizers[0])
        self.taken["rng"] = torch.get_rng_state()
        self.taken["model"] = copy.deepcopy(pl_module.network)

    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                      task_id: int) -> None:
        if task_id == self.task:
            self.take(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            self.take(trainer, pl_module)


def assert_same(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual["params"].keys() == expected["params"].keys()
    for name, value in expected["params"].items():
        assert torch.equal(actual["params"][name], value), name
    assert actual["state"].keys() == expected["state"].keys()
    for name, entries in expected["state"].items():
        for key, value in entries.items():
            assert torch.equal(actual["state"][name][key], value), (name, key)


MLP_LAYERS = [("layers.0.linear", "layers.1.linear"), ("layers.1.linear", "head")]


def replace_units_reference(expected: dict[str, Any], model: nn.Module,
                            units: list[list[int]], seeds: list[int]) -> None:
    """What replacing ``units[i]`` of the MLP's layer ``i`` must do, written out: fresh
    incoming rows (all layers first), then zero outgoing columns, and zero optimizer state."""
    modules = dict(model.named_modules())
    for (incoming, _), u, seed in zip(MLP_LAYERS, units, seeds):
        if not u:
            continue
        fresh = fresh_initialization(modules[incoming], seed)
        for kind in ("weight", "bias"):
            name = f"network.{incoming}.{kind}"
            expected["params"][name][u] = getattr(fresh, kind).detach()[u]
            for value in expected["state"].get(name, {}).values():
                if value.dim() > 0:
                    value[u] = 0
    for (_, outgoing), u in zip(MLP_LAYERS, units):
        name = f"network.{outgoing}.weight"
        expected["params"][name][:, u] = 0
        for value in expected["state"].get(name, {}).values():
            if value.dim() > 0:
                value[:, u] = 0


# ------------------------------------------------------------------------------- bad input

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


# ------------------------------------------------------------------------------- ShrinkAndPerturb

def test_shrink_and_perturb_is_exact_and_leaves_the_rng_alone() -> None:
    before, after = Snapshot(task=1), Snapshot(task=1)
    cb = ShrinkAndPerturb(alpha=0.4, sigma=0.1, seed=123)
    fit([before, cb, after])
    assert cb.num_applied == 1  # task 1 only: task 0 starts from a fresh initialisation
    assert before.taken is not None and after.taken is not None
    fresh = dict(fresh_initialization(before.taken["model"], cb.last_seed).named_parameters())
    assert cb.last_seed == cb.seed_for("task_start", 5)
    expected = copy.deepcopy({k: v for k, v in before.taken.items() if k in ("params", "state")})
    for name, value in expected["params"].items():
        expected["params"][name] = shrink_perturb(value, fresh[name.removeprefix("network.")],
                                                  0.4, 0.1)
    assert_same(after.taken, expected)
    assert torch.equal(after.taken["rng"], before.taken["rng"])


def test_continual_shrink_and_perturb_every_step() -> None:
    cb = ShrinkAndPerturb(alpha=0.999, sigma=0.001, on_task_start=False, every_n_train_steps=2,
                          seed=0)
    fit([cb])
    assert cb.num_applied == 5
    state = cb.state_dict()
    other = ShrinkAndPerturb(seed=1)
    other.load_state_dict(state)
    assert other.base_seed == 0 and other.num_applied == 5 and other._last_step == 10


# ------------------------------------------------------------------------------- ResetLayers

def test_reset_last_layer_touches_only_the_head() -> None:
    before, after = Snapshot(task=1), Snapshot(task=1)
    cb = ResetLayers(seed=3)
    fit([before, cb, after])
    assert cb.resolved_layers == ["network.head"] and cb.num_applied == 1
    fresh = fresh_initialization(before.taken["model"].head, cb.last_seed)
    expected = copy.deepcopy({k: v for k, v in before.taken.items() if k in ("params", "state")})
    for kind in ("weight", "bias"):
        expected["params"][f"network.head.{kind}"] = getattr(fresh, kind).detach()
        del expected["state"][f"network.head.{kind}"]  # stale moments are dropped
    assert not torch.equal(expected["params"]["network.head.weight"],
                           before.taken["params"]["network.head.weight"])
    assert_same(after.taken, expected)
    assert torch.equal(after.taken["rng"], before.taken["rng"])


def test_reset_optimizer_clears_all_state_and_unknown_layers_are_listed() -> None:
    after = Snapshot(task=1)
    fit([ResetLayers(reset_layers=False, reset_optimizer=True), after])
    assert after.taken["state"] == {}
    with pytest.raises(ValueError, match=r"'network\.hed'.*'network\.head'"):
        fit([ResetLayers(layers=["network.hed"])])


# ------------------------------------------------------------------------------- ReDo

class KillUnits(Snapshot):
    """At ``step``, makes some units dead (zero incoming weights, negative bias), then snapshots."""

    def __init__(self, step: int, units: dict[str, list[int]]) -> None:
        super().__init__(step=step)
        self.units = units

    def take(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            for layer, units in self.units.items():
                linear = dict(pl_module.named_modules())[layer]
                linear.weight[units] = 0.0
                linear.bias[units] = -1.0
        super().take(trainer, pl_module)
        x, _ = trainer.datamodule.probe_batch(64)
        self.probe = x.flatten(1)


def test_redo_recycles_exactly_the_dormant_units() -> None:
    tau = 0.025
    kill = KillUnits(step=3, units={"network.layers.0.linear": [2, 5],
                                    "network.layers.1.linear": [7]})
    cb = ReDo(tau=tau, every_n_train_steps=3, on_task_start=False, probe_size=64, seed=5)
    after = Snapshot(step=3)
    fit([kill, cb, after], max_steps=3)
    # An independent reference: s_i = E|h_i| / mean_k E|h_k| on the probe batch, before ReDo.
    net = kill.taken["model"]
    h0 = torch.relu(net.layers[0].linear(kill.probe))
    h1 = torch.relu(net.layers[1].linear(h0))
    dormant = []
    for h in (h0, h1):
        activity = h.abs().mean(0)
        dormant.append((activity / activity.mean() <= tau).nonzero().flatten().tolist())
    assert {2, 5} <= set(dormant[0]) and 7 in dormant[1]
    assert cb.last_units == {"network.layers.0.linear": dormant[0],
                             "network.layers.1.linear": dormant[1]}
    expected = copy.deepcopy({k: v for k, v in kill.taken.items() if k in ("params", "state")})
    replace_units_reference(expected, net, dormant, [cb.seed_for("step", 3, i) for i in (0, 1)])
    assert_same(after.taken, expected)
    # The dead units had Adam moments; now those entries are zero and the rows are alive.
    assert kill.taken["state"]["network.layers.0.linear.weight"]["exp_avg_sq"][[2, 5]].abs().sum() \
        > 0
    assert after.taken["params"]["network.layers.0.linear.weight"][[2, 5]].abs().sum() > 0
    assert torch.equal(after.taken["rng"], kill.taken["rng"])
    assert len(cb.history) == 1 and cb.history[0]["step"] == 3
    assert cb.history[0]["dormant"]["network.layers.0.linear"] == len(dormant[0])


# ------------------------------------------------------------------------------- ContinualBackprop

class RecordingCBP(ContinualBackprop):
    """Records, at every replacement, the bias-corrected utilities and maturity it chose from."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[dict[str, Any]] = []

    def replace_units(self, trainer: pl.Trainer, counts: dict[int, int]) -> None:
        names = [layer.name for layer in self.unit_layers]
        self.events.append({
            "step": trainer.global_step, "counts": {names[i]: c for i, c in counts.items()},
            "utility": {n: self.bias_corrected_utility(n).clone() for n in names},
            "mature": {n: (self.ages[n] > self.maturity_threshold).clone() for n in names}})
        super().replace_units(trainer, counts)
        self.events[-1]["replaced"] = {n: list(u) for n, u in self.last_replaced.items()}


class ActivationRecorder(pl.Callback):
    """Records, every step, ``E|h|`` of layers.0 and the post-step outgoing weights."""

    def __init__(self) -> None:
        self.contributions: list[Tensor] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            if module.training:
                self.h = output.detach().abs().mean(0)
        pl_module.network.layers[0].act.register_forward_hook(hook)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        w = pl_module.network.layers[1].linear.weight.detach()
        self.contributions.append(self.h * w.abs().sum(0))


def test_cbp_accrues_no_budget_before_maturity_and_matches_the_hand_ema() -> None:
    recorder = ActivationRecorder()
    cb = ContinualBackprop(replacement_rate=0.5, maturity_threshold=100, decay_rate=0.9, seed=0)
    fit([cb, recorder])
    name = "network.layers.0.linear"
    assert cb.budget == {name: 0.0, "network.layers.1.linear": 0.0}
    assert sum(cb.num_replaced.values()) == 0
    assert cb.ages[name].tolist() == [10] * WIDTH
    c = recorder.contributions
    hand = sum((1 - 0.9) * 0.9 ** (len(c) - j) * c[j - 1] for j in range(1, len(c) + 1))
    assert torch.allclose(cb.utility[name], hand, rtol=1e-5, atol=1e-7)
    assert torch.allclose(cb.bias_corrected_utility(name), hand / (1 - 0.9 ** len(c)),
                          rtol=1e-5, atol=1e-7)
    # The state round-trips through a checkpoint (restored before the layers are known).
    restored = ContinualBackprop(replacement_rate=0.5, maturity_threshold=100, decay_rate=0.9)
    restored.load_state_dict(cb.state_dict())
    fit([restored], max_steps=0)
    assert torch.equal(restored.utility[name], cb.utility[name])
    assert torch.equal(restored.ages[name], cb.ages[name])
    assert restored.base_seed == 0 and restored.budget == cb.budget


def test_cbp_replaces_lowest_utility_mature_units_and_touches_only_them() -> None:
    cb = RecordingCBP(replacement_rate=0.25, maturity_threshold=2, seed=1)
    before, after = Snapshot(step=3), Snapshot(step=3)
    fit([before, cb, after])
    first = cb.events[0]
    assert first["step"] == 3  # ages 3 > 2: all 16 units mature, budget 0.25 * 16 = 4
    expected = copy.deepcopy({k: v for k, v in before.taken.items() if k in ("params", "state")})
    units = []
    for inc, _ in MLP_LAYERS:
        name = f"network.{inc}"
        assert first["counts"][name] == 4
        order = torch.sort(first["utility"][name], stable=True).indices[:4].sort().values
        assert first["replaced"][name] == order.tolist()
        units.append(first["replaced"][name])
    replace_units_reference(expected, before.taken["model"], units,
                            [cb.seed_for(3, i) for i in (0, 1)])
    assert_same(after.taken, expected)
    assert torch.equal(after.taken["rng"], before.taken["rng"])
    # Replaced units start over: young again, utility reset.
    assert all(cb.ages[n].min() >= 0 for n in cb.ages)


def test_cbp_never_replaces_a_whole_layer() -> None:
    cb = RecordingCBP(replacement_rate=1.0, maturity_threshold=1, seed=2)
    fit([cb])
    assert cb.events, "a rate of 1 must replace units"
    for event in cb.events:
        for name, count in event["counts"].items():
            assert len(event["replaced"][name]) == count
            assert count <= min(WIDTH - 1, int(event["mature"][name].sum()))
            assert all(event["mature"][name][event["replaced"][name]])


class CheckedCBP(ContinualBackprop):
    """After every replacement, checks the replaced units' outgoing columns and norm entries."""

    def replace_units(self, trainer: pl.Trainer, counts: dict[int, int]) -> None:
        super().replace_units(trainer, counts)
        for i in counts:
            layer = self.unit_layers[i]
            units = torch.tensor(self.last_replaced[layer.name])
            cols = layer.outgoing_columns(units)
            assert cols.numel() == units.numel() * layer.multiplier * layer.group
            assert layer.outgoing.weight[:, cols].abs().sum() == 0
            if isinstance(layer.norm, nn.BatchNorm1d | nn.BatchNorm2d):
                assert torch.equal(layer.norm.weight[units], torch.ones(len(units)))
                assert torch.equal(layer.norm.running_var[units], torch.ones(len(units)))


@pytest.mark.parametrize("network", [
    functools.partial(CNN, channels=(4,), hidden=8, norm="batch"),
    functools.partial(MLP, width=8, activation="crelu", norm="layer"),
])
def test_unit_interventions_on_conv_norm_and_crelu_networks(network: Any) -> None:
    cbp = CheckedCBP(replacement_rate=0.5, maturity_threshold=1, seed=0)
    redo = ReDo(tau=0.5, every_n_train_steps=4, on_task_start=False, seed=0)
    fit([cbp, redo], model=ContinualClassifier(network=network))
    assert sum(cbp.num_replaced.values()) > 0
    assert redo.num_applied == 2 and redo.num_reset_total > 0


def test_resuming_inside_a_task_does_not_repeat_its_start(tmp_path: Any) -> None:
    class CountStarts(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[int] = []

        def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                          task_id: int) -> None:
            self.starts.append(task_id)

    pl.seed_everything(0)
    first = ShrinkAndPerturb()
    trainer = fast_trainer(callbacks=[first], limit_val_batches=0, max_steps=7)
    trainer.fit(classifier(), datamodule=stream())
    assert first.num_applied == 1
    trainer.save_checkpoint(tmp_path / "mid_task.ckpt")
    resumed, starts = ShrinkAndPerturb(), CountStarts()
    fast_trainer(callbacks=[resumed, starts], limit_val_batches=0).fit(
        classifier(), datamodule=stream(), ckpt_path=tmp_path / "mid_task.ckpt",
        weights_only=False)  # the hyperparameters hold a functools.partial
    assert resumed.base_seed == first.base_seed
    assert resumed.num_applied == 1, f"task starts seen on resume: {starts.starts}"
