"""Exact resume from a checkpoint at every position relative to a task switch.

With ``K`` steps per task, task ``t`` runs global steps ``K t .. K t + K - 1``; a checkpoint taken
at ``global_step == s`` holds ``s`` finished steps. The positions: ``2K`` (exactly at the
boundary: task 1 finished, task 2 not started), ``2K + 1`` (after the first step of task 2),
mid-task, and ``3K - 1`` (before the last step of task 2).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_plasticity.callbacks import ParameterStatsCallback, UnitActivityCallback
from lightning_plasticity.models import ContinualClassifier
from tests.callbacks.helpers import without_timing
from tests.data.helpers import EventRecorder, RecordingDataModule, fast_trainer, flat_params

K = 6
NUM_TASKS = 4


def run(tmp: Path, name: str, *, max_steps: int = -1, ckpt_every: int | None = None,
        ckpt_path: str | None = None) -> tuple:
    dm = RecordingDataModule("digits", "permuted_labels", num_tasks=NUM_TASKS, steps_per_task=K,
                             batch_size=16)
    recorder = EventRecorder()
    measures = [UnitActivityCallback(probe_size=32), ParameterStatsCallback()]
    callbacks: list[pl.Callback] = [recorder, *measures]
    if ckpt_every is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp / name, every_n_train_steps=ckpt_every,
                                         save_top_k=-1))
    trainer = fast_trainer(callbacks=callbacks, limit_val_batches=1, max_steps=max_steps,
                           enable_checkpointing=ckpt_every is not None)
    model = ContinualClassifier()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return dm, recorder, measures, model, trainer


@pytest.mark.parametrize("position", [2 * K, 2 * K + 1, 2 * K + K // 2, 3 * K - 1],
                         ids=["boundary", "first_step", "mid_task", "last_step"])
def test_resume_at_any_position_equals_the_uninterrupted_run(tmp_path: Path,
                                                             position: int) -> None:
    pl.seed_everything(0)
    full_dm, full_events, full_measures, full_model, _ = run(tmp_path, "full")

    pl.seed_everything(0)
    first_dm, first_events, _, _, _ = run(tmp_path, "first", max_steps=position,
                                          ckpt_every=position)
    path = next((tmp_path / "first").glob(f"*step={position}.ckpt"))

    pl.seed_everything(123)  # the resumed run must not depend on the global seed
    dm, events, measures, model, trainer = run(tmp_path, "resumed", ckpt_path=str(path))

    assert trainer.global_step == NUM_TASKS * K
    assert first_dm.records + dm.records == full_dm.records  # the same batches, tasks, steps
    # Every task event from the checkpoint on, once (events are (event, task, global_step); at a
    # boundary the checkpoint precedes the end of the finished task, as after a crash).
    assert events.events == [e for e in full_events.events if e[2] >= position]
    assert repr(dm.task_history) == repr(full_dm.task_history)  # NaN-safe equality
    for mine, full in zip(measures, full_measures, strict=True):
        assert repr(without_timing(mine.history)) == repr(without_timing(full.history)), \
            type(mine).__name__
    torch.testing.assert_close(flat_params(model), flat_params(full_model), rtol=0, atol=0)
