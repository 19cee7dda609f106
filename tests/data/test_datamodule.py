"""Training through the task stream: exact switches, workers, events, metrics, epochs mode."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_plasticity.data import TASK_KINDS
from lightning_plasticity.models import ContinualClassifier, ContinualRegressor
from tests.data.helpers import EventRecorder, RecordingDataModule, fast_trainer
from tests.data.test_tasks import DATASET_FOR

K = 6


def run(kind: str = "permuted_labels", callbacks=(), **dm_kwargs):  # noqa: ANN001, ANN201
    dm_kwargs.setdefault("num_tasks", 3)
    if "epochs_per_task" not in dm_kwargs:
        dm_kwargs.setdefault("steps_per_task", K)
    dm = RecordingDataModule(DATASET_FOR.get(kind, "digits"), kind, batch_size=16, **dm_kwargs)
    pl.seed_everything(0)
    model = ContinualRegressor() if dm.is_regression else ContinualClassifier()
    trainer = fast_trainer(callbacks=list(callbacks), limit_val_batches=2, log_every_n_steps=1)
    trainer.fit(model, datamodule=dm)
    return dm, trainer, model


@pytest.mark.parametrize("kind", sorted(TASK_KINDS))
def test_switches_exactly_every_k_steps(kind: str) -> None:
    dm, trainer, _ = run(kind)
    assert trainer.global_step == 3 * K
    steps = [r[0] for r in dm.records]
    assert steps == list(range(3 * K))
    for step, batch_task, current_task, idx in dm.records:
        assert batch_task == current_task == step // K
        assert set(idx) <= set(dm.task_examples(batch_task).tolist())
    assert [h["task"] for h in dm.task_history] == [0, 1, 2]


def test_same_batches_with_two_persistent_workers() -> None:
    plain, _, _ = run("random_labels")
    workers, _, _ = run("random_labels", num_workers=2, persistent_workers=True)
    assert workers.records == plain.records


def test_task_events_order_and_counts() -> None:
    order: list[str] = []

    class Module(ContinualClassifier):
        def on_task_start(self, trainer, pl_module, task_id):  # noqa: ANN001, ANN201
            order.append(f"module start {task_id}")

        def on_task_end(self, trainer, pl_module, task_id):  # noqa: ANN001, ANN201
            order.append(f"module end {task_id}")

    class Cb(pl.Callback):
        def on_task_start(self, trainer, pl_module, task_id):  # noqa: ANN001, ANN201
            order.append(f"callback start {task_id} dm={trainer.datamodule.task_id}")

        def on_task_end(self, trainer, pl_module, task_id):  # noqa: ANN001, ANN201
            order.append(f"callback end {task_id}")

    recorder = EventRecorder()
    dm = RecordingDataModule("digits", "permuted_labels", num_tasks=3, steps_per_task=K)
    fast_trainer(callbacks=[Cb(), recorder], limit_val_batches=1).fit(Module(), datamodule=dm)
    assert recorder.events == [("start", 0, 0), ("end", 0, K), ("start", 1, K), ("end", 1, 2 * K),
                               ("start", 2, 2 * K), ("end", 2, 3 * K)]
    assert order[:5] == ["module start 0", "callback start 0 dm=0", "module end 0",
                         "callback end 0", "module start 1"]


def test_metrics_are_logged() -> None:
    _, trainer, _ = run("permuted_labels", val_previous_tasks=1)
    metrics = trainer.callback_metrics
    for key in ["task/id", "task/train_loss", "task/train_accuracy", "task/end_loss",
                "task/end_accuracy", "task/val_loss", "task/val_accuracy",
                "task/val_accuracy_prev1"]:
        assert key in metrics, key
    assert metrics["task/id"].item() == 2


def test_end_metrics_average_the_last_batches() -> None:
    losses: list[float] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
            losses.append(float(outputs["loss"]))

    dm, _, _ = run("permuted_labels", callbacks=[Spy()], end_window=4, num_tasks=2)
    for t in range(2):
        window = losses[(t + 1) * K - 4:(t + 1) * K]
        assert dm.task_history[t]["end_loss"] == pytest.approx(sum(window) / 4, rel=1e-5)


def test_epochs_per_task() -> None:
    recorder = EventRecorder()
    dm, trainer, _ = run("class_pairs", callbacks=[recorder], epochs_per_task=2,
                         subset_size=40)
    # 40 examples in batches of 16 -> 3 batches per epoch, 2 epochs per task, 3 tasks.
    assert trainer.global_step == 18
    assert [e for e in recorder.events if e[0] == "start"] == [("start", 0, 0), ("start", 1, 6),
                                                               ("start", 2, 12)]
    for t in range(3):
        seen = {i for r in dm.records if r[1] == t for i in r[3]}
        assert seen == set(dm.task_examples(t).tolist())


def test_learns_the_first_task() -> None:
    dm, _, _ = run("identity", num_tasks=1, steps_per_task=150)
    assert dm.task_history[0]["end_accuracy"] > 0.85


def test_accumulate_grad_batches_keeps_k_optimizer_steps() -> None:
    dm = RecordingDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=K)
    recorder = EventRecorder()
    trainer = fast_trainer(callbacks=[recorder], accumulate_grad_batches=2, limit_val_batches=1)
    trainer.fit(ContinualClassifier(), datamodule=dm)
    assert trainer.global_step == 2 * K
    assert len(dm.records) == 4 * K
    assert recorder.events[2] == ("start", 1, K)


def test_probe_batch_is_fixed() -> None:
    dm = RecordingDataModule("digits", "permuted_labels")
    a, b = dm.probe_batch(32, task_id=1), dm.probe_batch(32, task_id=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (32, 1, 8, 8)


def test_task_level_metrics() -> None:
    accs: list[float] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
            accs.append(float((outputs["logits"].argmax(-1) == batch[1]).float().mean()))

    dm, trainer, _ = run("identity", callbacks=[Spy()], num_tasks=2, steps_per_task=40,
                         end_window=5, target_accuracy=0.5, trainability_tolerance=0.01)
    for t, record in enumerate(dm.task_history):
        task = accs[40 * t:40 * (t + 1)]
        assert record["online_accuracy"] == pytest.approx(sum(task) / 40, rel=1e-5)
        means = [sum(task[max(0, i - 4):i + 1]) / min(i + 1, 5) for i in range(40)]
        first = next((i + 1 for i, m in enumerate(means) if m >= 0.5), float("nan"))
        assert record["steps_to_target"] == first
    ends = [h["end_accuracy"] for h in dm.task_history]
    # Trainable: within the tolerance of the best task end so far (the first task always is).
    assert [h["trainable"] for h in dm.task_history] == [
        float(e >= max(ends[:t + 1]) - 0.01) for t, e in enumerate(ends)]
    for key in ("task/online_accuracy", "task/steps_to_target", "task/trainable"):
        assert key in trainer.callback_metrics
