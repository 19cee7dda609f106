"""Every zoo module trains for a few steps, and the planted network has exactly known dead units.

These tests only exercise the zoo itself (``tests/zoo/modules.py``), not ``lightning_plasticity``.
"""

import lightning.pytorch as pl
import pytest
import torch

from tests.zoo.modules import ZOO, PlantedDeadUnits, fit, planted_loader


def test_zoo_is_big_enough():
    assert len(ZOO) >= 18
    assert all(name == entry.name for name, entry in ZOO.items())


class _Snapshot(pl.Callback):
    """Records the parameters as training starts."""

    def on_train_start(self, trainer, pl_module):
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_entry_fits(name):
    entry = ZOO[name]
    snapshot = _Snapshot()
    trainer, module = fit(entry, callbacks=[snapshot])
    assert trainer.global_step == 8
    changed = False
    for pname, p in module.named_parameters():
        assert torch.isfinite(p).all(), f"{name}: parameter {pname} is not finite"
        changed = changed or not torch.equal(p, snapshot.before[pname])
    assert changed, f"{name}: training did not change any parameter"
    if name == "counter_buffer":
        assert int(module.calls) == 8


@pytest.mark.parametrize("name", ["functional_relu", "dict_batch", "torch_relu"])
def test_loader_is_deterministic(name):
    loader = ZOO[name].make_dataloader
    torch.manual_seed(1)
    first = next(iter(loader()))
    torch.manual_seed(2)
    second = next(iter(loader()))
    flat_a = first.values() if isinstance(first, dict) else first
    flat_b = second.values() if isinstance(second, dict) else second
    for a, b in zip(flat_a, flat_b):
        assert torch.equal(a, b)


def test_planted_dead_units_are_exact():
    torch.manual_seed(0)
    module = PlantedDeadUnits(dead=16)
    x = torch.cat([batch[0] for batch in planted_loader()])
    assert x.shape[0] >= 64
    with torch.no_grad():
        hidden = torch.relu(module.fc1(x))
    dead = (hidden == 0).all(dim=0)
    assert int(dead.sum()) == 16
    assert dead[:16].all()
    # Every other unit is active on every input.
    assert (hidden[:, ~dead] > 0).all()


def test_functional_relu_make_planted():
    torch.manual_seed(0)
    module = ZOO["functional_relu"].make_module().make_planted(5)
    assert module.planted_dead_units == 5
    x = torch.cat([batch[0] for batch in ZOO["functional_relu"].make_dataloader()])
    with torch.no_grad():
        hidden = torch.relu(module.fc1(x))
    assert (hidden[:, :5] == 0).all()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_fit_is_reproducible(name):
    """Two fits with the same seed end in identical parameters and buffers."""
    _, first = fit(ZOO[name])
    _, second = fit(ZOO[name])
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{name}: {key} differs between identical fits"
