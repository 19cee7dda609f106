"""Small modules and runs shared by the callback tests (importable by spawned DDP workers)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_plasticity.data import ContinualDataModule
from lightning_plasticity.models import MLP, ContinualClassifier


def small_classifier() -> ContinualClassifier:
    return ContinualClassifier(network=partial(MLP, width=16, depth=2))


def small_stream(**kwargs: Any) -> ContinualDataModule:
    defaults: dict[str, Any] = dict(num_tasks=3, steps_per_task=5, batch_size=16)
    defaults.update(kwargs)
    return ContinualDataModule("digits", "permuted_labels", **defaults)


class LoggingModule(pl.LightningModule):
    """A module written without this package: logs inside training_step, returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("my_loss", loss, on_step=True)
        return {"loss": loss}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def without_timing(obj: Any) -> Any:
    """``obj`` without the ``.../measure_seconds/...`` entries: wall time differs between runs
    that are otherwise identical (resumed vs uninterrupted, one process vs DDP)."""
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items()
                if not (isinstance(k, str) and "/measure_seconds/" in k)}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


class HistoryDump(pl.Callback):
    """Writes the measurement callbacks' histories, without timing, to a folder (for
    ddp_spawn tests)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        histories = {type(c).__name__: without_timing(c.history) for c in trainer.callbacks
                     if hasattr(c, "history") and isinstance(c.history, list)}
        path = Path(self.folder) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(histories))


class NoForwardReLU(pl.LightningModule):
    """A user's module with no forward(): F.relu between layers called in training_step."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(64, 24), nn.Linear(24, 16), nn.Linear(16, 10)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = nn.functional.relu(self.fc1(x.flatten(1)))
        h = torch.relu(self.fc2(h))
        loss = nn.functional.cross_entropy(self.out(h), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)
