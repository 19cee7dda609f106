"""ResetLayers: reinitialised layers and dropped optimizer state."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_plasticity.core.initialization import fresh_initialization
from lightning_plasticity.interventions import ResetLayers
from tests.interventions.helpers import Snapshot, assert_same, fit


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
