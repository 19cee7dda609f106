"""Shared runs and bit-exact snapshots for the intervention tests.

Each intervention must touch exactly the parameters and optimizer state it should: the tests
rebuild the expected tensors independently from snapshots taken right before the intervention
and compare bit for bit.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_plasticity.core.initialization import fresh_initialization
from lightning_plasticity.data import ContinualDataModule
from lightning_plasticity.models import MLP, ContinualClassifier
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
