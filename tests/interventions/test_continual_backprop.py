"""ContinualBackprop: utilities, budgets and replacements (and ReDo on conv/CReLU nets)."""

from __future__ import annotations

import copy
import functools
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

from lightning_plasticity.interventions import ContinualBackprop, ReDo
from lightning_plasticity.models import CNN, MLP, ContinualClassifier
from tests.interventions.helpers import (
    MLP_LAYERS,
    WIDTH,
    Snapshot,
    assert_same,
    fit,
    replace_units_reference,
)


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
