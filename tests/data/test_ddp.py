"""DDP (ddp_spawn, 2 CPU processes, gloo): every rank is in the same task at the same step."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from lightning.pytorch.strategies import DDPStrategy

from lightning_plasticity.models import ContinualClassifier
from tests.data.helpers import EventRecorder, RecordingDataModule, fast_trainer

K = 5


def test_ranks_share_tasks_and_split_each_global_batch(tmp_path: Path) -> None:
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    dm = RecordingDataModule("digits", "class_pairs", num_tasks=3, steps_per_task=K,
                             batch_size=8, record_dir=str(tmp_path / "ddp"))
    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo",
                           timeout=timedelta(seconds=60))
    trainer = fast_trainer(devices=2, strategy=strategy, limit_val_batches=1, log_every_n_steps=1,
                           callbacks=[EventRecorder()], deterministic=False)
    trainer.fit(ContinualClassifier(), datamodule=dm)
    assert trainer.callback_metrics["task/id"].item() == 2
    assert "task/end_accuracy" in trainer.callback_metrics

    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    single_dm = RecordingDataModule("digits", "class_pairs", num_tasks=3, steps_per_task=K,
                                    batch_size=16, record_dir=str(tmp_path / "single"))
    fast_trainer(limit_val_batches=1).fit(ContinualClassifier(), datamodule=single_dm)

    r0, r1 = ranks[0]["records"], ranks[1]["records"]
    assert len(r0) == len(r1) == len(single_dm.records) == 3 * K
    for a, b, whole in zip(r0, r1, single_dm.records):
        step, batch_task, dm_task, idx0 = a
        assert (step, batch_task, dm_task) == tuple(b[:3]) == tuple(whole[:3])
        assert batch_task == step // K
        # The ranks' shards are the two halves of the single-process global batch.
        assert idx0 + b[3] == whole[3]
    assert [h["task"] for h in ranks[0]["history"]] == [0, 1, 2]
    # End metrics are averaged over ranks (repr: NaN-safe equality).
    assert repr(ranks[0]["history"]) == repr(ranks[1]["history"])
