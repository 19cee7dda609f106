"""Planted cases with known answers through the probe: dead units behind functional ReLUs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_plasticity.callbacks import UnitActivityCallback
from tests.data.helpers import fast_trainer
from tests.zoo.modules import PlantedDeadUnits, planted_loader


class TorchReLUPlanted(PlantedDeadUnits):
    """The same network with ``torch.relu`` and a dict batch."""

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        out = self.fc2(torch.relu(self.fc1(x)))
        return {"loss": F.cross_entropy(out, y)}


@pytest.mark.parametrize("module_cls", [PlantedDeadUnits, TorchReLUPlanted])
@pytest.mark.parametrize("dead", [0, 5, 16])
def test_exactly_k_dead_units_behind_a_functional_relu(module_cls: type, dead: int) -> None:
    torch.manual_seed(0)
    module = module_cls(dead=dead, width=128)
    cb = UnitActivityCallback(tau=0.0, probe_size=64)
    trainer = fast_trainer(callbacks=[cb], max_steps=1, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=planted_loader())
    first = cb.history[0]
    assert first["event"] == "fit_start"
    assert first["units/num_dead"] == dead
    assert first["units/fc2.input/dead_fraction"] == pytest.approx(dead / 128)
