"""Test helpers for training runs on the task stream (importable by spawned DDP workers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_plasticity.data import ContinualDataModule


class RecordingDataModule(ContinualDataModule):
    """Records, for every training batch, the step, its task id and its example indices."""

    def __init__(self, *args: Any, record_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.record_dir = record_dir
        self.records: list[tuple[int, int, int, list[int]]] = []

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and batch[4] == "train":
            self.records.append((self.trainer.global_step, int(batch[3]), self.task_id,
                                 batch[2].tolist()))
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def teardown(self, stage: str) -> None:
        if self.record_dir is not None and self.trainer is not None:
            path = Path(self.record_dir) / f"rank{self.trainer.global_rank}.json"
            path.write_text(json.dumps({"records": self.records,
                                        "history": self.task_history}))


class EventRecorder(pl.Callback):
    """Records task events as (event, task_id, global_step)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []

    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                      task_id: int) -> None:
        self.events.append(("start", task_id, trainer.global_step))

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                    task_id: int) -> None:
        self.events.append(("end", task_id, trainer.global_step))


def fast_trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])
