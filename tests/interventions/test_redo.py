"""ReDo: recycling exactly the dormant units."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch

from lightning_plasticity.interventions import ReDo
from tests.interventions.helpers import Snapshot, assert_same, fit, replace_units_reference


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
