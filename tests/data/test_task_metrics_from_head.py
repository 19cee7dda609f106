"""Task metrics for a user's module whose training_step returns only its loss."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_plasticity.data import ContinualDataModule
from tests.data.helpers import fast_trainer


class LossOnly(pl.LightningModule):
    """No forward(); training_step returns the bare loss, as most users write it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32))
        self.classifier = nn.Linear(32, 10)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.relu(self.body(x)))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return F.cross_entropy(self.logits(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class WithLogits(LossOnly):
    """The same module returning its logits, the path the metrics always supported."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        logits = self.logits(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}


def _history(module_cls: type) -> list[dict[str, float]]:
    pl.seed_everything(0)
    dm = ContinualDataModule("digits", "permuted_labels", num_tasks=3, steps_per_task=6,
                             batch_size=16)
    fast_trainer(limit_val_batches=0).fit(module_cls(), datamodule=dm)
    return dm.task_history


def test_loss_only_module_gets_the_same_task_metrics_as_one_returning_logits() -> None:
    loss_only, with_logits = _history(LossOnly), _history(WithLogits)
    assert len(loss_only) == 3
    for a, b in zip(loss_only, with_logits, strict=True):
        for key in ("end_accuracy", "online_accuracy", "steps_to_target", "end_loss"):
            assert key in a, key
            assert a[key] == pytest.approx(b[key], nan_ok=True), key


class Diverging(LossOnly):
    """A learning rate that sends the loss to infinity within a few steps."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e12)


def test_divergence_is_reported_once_and_tasks_are_not_trainable() -> None:
    pl.seed_everything(0)
    dm = ContinualDataModule("digits", "permuted_labels", num_tasks=3, steps_per_task=6,
                             batch_size=16)
    with pytest.warns(UserWarning, match="the run has diverged") as record:
        fast_trainer(limit_val_batches=0).fit(Diverging(), datamodule=dm)
    assert sum("diverged" in str(w.message) for w in record) == 1
    assert [h["trainable"] for h in dm.task_history][-1] == 0.0


class Frozen(LossOnly):
    """Never learns (learning rate 0): every task ends at chance."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_run_at_chance_is_not_trainable() -> None:
    pl.seed_everything(0)
    dm = ContinualDataModule("digits", "permuted_labels", num_tasks=3, steps_per_task=6,
                             batch_size=16)
    fast_trainer(limit_val_batches=0).fit(Frozen(), datamodule=dm)
    assert 0.05 < dm.chance_accuracy() < 0.15  # ten balanced classes
    assert [h["trainable"] for h in dm.task_history] == [0.0, 0.0, 0.0]
