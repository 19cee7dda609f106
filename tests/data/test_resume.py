"""Resume from a checkpoint taken mid-task continues the same task at the same step."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_plasticity.models import ContinualClassifier
from tests.data.helpers import EventRecorder, RecordingDataModule, fast_trainer, flat_params

K = 8


def make(tmp: Path, name: str, **trainer_kwargs):  # noqa: ANN003, ANN201
    dm = RecordingDataModule("digits", "random_labels", num_tasks=3, steps_per_task=K,
                             batch_size=16, subset_size=200)
    recorder = EventRecorder()
    callbacks = [recorder, *trainer_kwargs.pop("callbacks", [])]
    trainer = fast_trainer(logger=CSVLogger(tmp, name=name), log_every_n_steps=1,
                           callbacks=callbacks, limit_val_batches=1, **trainer_kwargs)
    return dm, recorder, trainer


def logged_task_ids(trainer: pl.Trainer) -> dict[int, float]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return {int(r["step"]): float(r["task/id"]) for r in csv.DictReader(f) if r.get("task/id")}


def test_resume_mid_task_equals_uninterrupted_run(tmp_path: Path) -> None:
    pl.seed_everything(0)
    full_dm, full_events, full_trainer = make(tmp_path, "full")
    full_model = ContinualClassifier()
    full_trainer.fit(full_model, datamodule=full_dm)

    # Stop after 2.5 tasks with a checkpoint written mid-task.
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=20, save_top_k=-1)
    first_dm, first_events, first_trainer = make(tmp_path, "first", max_steps=20,
                                                  callbacks=[ckpt], enable_checkpointing=True)
    first_trainer.fit(ContinualClassifier(), datamodule=first_dm)
    path = next((tmp_path / "ckpt").glob("*.ckpt"))

    pl.seed_everything(123)  # the resumed run must not depend on the global seed
    resumed_dm, resumed_events, resumed_trainer = make(tmp_path, "resumed")
    resumed_model = ContinualClassifier()
    resumed_trainer.fit(resumed_model, datamodule=resumed_dm, ckpt_path=str(path))

    assert resumed_trainer.global_step == full_trainer.global_step == 3 * K
    assert first_dm.records + resumed_dm.records == full_dm.records
    assert resumed_dm.records[0][:3] == (20, 2, 2)  # step 20 is in task 2
    assert first_events.events + resumed_events.events == full_events.events
    assert repr(resumed_dm.task_history) == repr(full_dm.task_history)  # NaN-safe equality
    torch.testing.assert_close(flat_params(resumed_model), flat_params(full_model), rtol=0,
                               atol=0)
    full_ids, resumed_ids = logged_task_ids(full_trainer), logged_task_ids(resumed_trainer)
    assert {s: v for s, v in full_ids.items() if s >= 20} == resumed_ids
