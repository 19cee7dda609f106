"""Where a task stream is: the current task, the last training batch, the task's batch metrics.

One object that :class:`~lightning_plasticity.data.ContinualDataModule` owns and checkpoints.
State flows one way: the samplers read it (``take_resume_offset``), the task-event dispatcher
advances it (``start_task``, ``record_batch``, ``end_task``), and nothing else writes it. No
Lightning import; the per-task metrics are pure functions of the recorded batches.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["TaskBatchMetrics", "TaskProgress", "end_task_metrics", "trainable_flag"]


class TaskBatchMetrics(Metric):
    """The training loss and accuracy of every batch of one task, as a torchmetrics ``Metric``.

    The states declare their cross-rank reduction: per batch position, the mean over ranks (every
    rank trains the same number of batches on its shard of the global batch), so ``compute()``
    returns the per-batch values of the global batches on every rank. The buffers grow as
    batches arrive; ``count`` (reduced by ``max``) says how many are filled.

    Example::

        >>> import torch
        >>> m = TaskBatchMetrics()
        >>> m.update(torch.tensor(0.5), torch.tensor(1.0))
        >>> m.update(torch.tensor(0.25), torch.tensor(0.5))
        >>> loss, accuracy = m.compute()
        >>> loss.tolist(), accuracy.tolist()
        ([0.5, 0.25], [1.0, 0.5])
    """

    full_state_update = False

    def __init__(self, capacity: int = 64) -> None:
        super().__init__(compute_with_cache=False)
        self.add_state("loss", torch.zeros(capacity, dtype=torch.float64), dist_reduce_fx="mean")
        self.add_state("accuracy", torch.zeros(capacity, dtype=torch.float64),
                       dist_reduce_fx="mean")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="max")
        self.add_state("accuracy_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="max")

    def _grow(self) -> None:
        for name in ("loss", "accuracy"):
            state = getattr(self, name)
            setattr(self, name, torch.cat([state, torch.zeros_like(state)]))

    def update(self, loss: Tensor, accuracy: Tensor | None = None) -> None:
        i = int(self.count)
        if i == self.loss.shape[0]:
            self._grow()
        self.loss[i] = loss.detach().to(self.loss)
        if accuracy is not None:
            self.accuracy[i] = accuracy.detach().to(self.accuracy)
            self.accuracy_count += 1
        self.count += 1

    def compute(self) -> tuple[Tensor, Tensor | None]:
        n = int(self.count)
        accuracy = self.accuracy[:n] if int(self.accuracy_count) == n else None
        return self.loss[:n], accuracy

    def values(self) -> list[tuple[float, float | None]]:
        """This rank's ``(loss, accuracy)`` per batch (no collective; for checkpoints)."""
        n, with_accuracy = int(self.count), int(self.accuracy_count) == int(self.count)
        return [(float(self.loss[i]), float(self.accuracy[i]) if with_accuracy else None)
                for i in range(n)]


class TaskProgress:
    """The stream position and the current task's training batches.

    Attributes:
        task_id: The current task.
        epoch: The epoch of the latest training batch recorded.
        epoch_batches: How many batches of that epoch have been recorded.
        batches: the current task's :class:`TaskBatchMetrics` (device tensors, reduced over
            ranks once at the task's end, so no step waits on a device sync).
        history: One record per finished task (``task``, ``global_step`` and the metrics).

    Example::

        >>> import torch
        >>> p = TaskProgress()
        >>> p.start_task(0)
        >>> p.record_batch(epoch=0, batch_idx=0, loss=torch.tensor(1.0), accuracy=None)
        >>> state = p.state_dict()
        >>> q = TaskProgress()
        >>> q.load_state_dict(state)
        >>> q.take_resume_offset(0), q.take_resume_offset(0)  # the offset is taken once
        (1, 0)
    """

    def __init__(self) -> None:
        self.task_id = 0
        self.epoch, self.epoch_batches = 0, 0
        self.batches = TaskBatchMetrics()
        self.history: list[dict[str, float]] = []
        self._resume: tuple[int, int] | None = None

    # ------------------------------------------------------------------ read
    def take_resume_offset(self, epoch: int) -> int:
        """Batches of ``epoch`` already trained before a resume (once; 0 afterwards)."""
        if self._resume is not None and self._resume[0] == epoch:
            offset = self._resume[1]
            self._resume = None
            return offset
        return 0

    def completed(self, epoch: int, batches_in_epoch: int, epochs_per_task: int) -> bool:
        """Whether ``epoch`` ended its task with all its batches (not cut short by max_steps)."""
        return ((epoch + 1) % epochs_per_task == 0 and self.epoch == epoch
                and self.epoch_batches == batches_in_epoch)

    def has_ended(self, task_id: int) -> bool:
        return any(int(h["task"]) == task_id for h in self.history)

    # ------------------------------------------------------------------ advance
    def start_task(self, task_id: int) -> None:
        self.task_id = task_id
        self.batches.reset()

    def record_batch(self, epoch: int, batch_idx: int, loss: Tensor,
                     accuracy: Tensor | None) -> None:
        self.epoch, self.epoch_batches = epoch, batch_idx + 1
        if self.batches.device != loss.device:
            self.batches.to(loss.device)
        self.batches.update(loss, accuracy)

    def end_task(self, record: dict[str, float]) -> None:
        self.history.append(record)

    def forget_resume(self) -> None:
        self._resume = None

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id, "epoch": self.epoch, "epoch_batches": self.epoch_batches,
            "task_batches": self.batches.values(),
            "task_history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.task_id = int(state["task_id"])
        self.epoch, self.epoch_batches = state["epoch"], state["epoch_batches"]
        self._resume = (self.epoch, self.epoch_batches)
        self.batches.reset()
        for loss, acc in state["task_batches"]:
            self.batches.update(torch.tensor(loss), None if acc is None else torch.tensor(acc))
        self.history = [dict(h) for h in state["task_history"]]


def end_task_metrics(losses: Tensor, accuracies: Tensor | None, *, end_window: int,
                     target_accuracy: float, accumulate_grad_batches: int = 1
                     ) -> dict[str, float]:
    """Task-level metrics from a task's per-batch training losses and accuracies.

    ``end_loss``/``end_accuracy``: means over the last ``end_window`` batches (the seeds'
    task-end batch error); ``online_accuracy``: the mean over the task; ``steps_to_target``:
    optimizer steps until the mean accuracy of the last ``end_window`` batches first reached
    ``target_accuracy`` (NaN if never).

    Example::

        >>> import torch
        >>> m = end_task_metrics(torch.tensor([1.0, 0.5]), torch.tensor([0.5, 1.0]),
        ...                      end_window=1, target_accuracy=0.9)
        >>> m["end_accuracy"], m["online_accuracy"], m["steps_to_target"]
        (1.0, 0.75, 2.0)
    """
    if losses.numel() == 0:
        return {}
    metrics = {"end_loss": losses[-end_window:].mean()}
    if accuracies is not None:
        acc = accuracies.float()
        metrics["end_accuracy"] = acc[-end_window:].mean()
        metrics["online_accuracy"] = acc.mean()
        # Mean over each trailing window of end_window batches (shorter at the start).
        window = torch.ones(end_window, device=acc.device, dtype=acc.dtype)
        sums = torch.nn.functional.conv1d(
            torch.nn.functional.pad(acc, (end_window - 1, 0))[None, None],
            window[None, None])[0, 0]
        counts = torch.arange(1, acc.shape[0] + 1, device=acc.device).clamp_max(end_window)
        reached = torch.nonzero(sums / counts >= target_accuracy)
        steps = float(reached[0, 0] + 1) if reached.numel() else float("nan")
        metrics["steps_to_target"] = torch.tensor(steps / accumulate_grad_batches)
    return {name: float(value) for name, value in metrics.items()}


def trainable_flag(record: dict[str, float], history: list[dict[str, float]],
                   tolerance: float, chance: float | None = None) -> float:
    """Lewandowski et al.'s tau-trainability flag against the best earlier task end.

    1 when the task-end accuracy is within ``tolerance`` of the best so far (for regression: the
    task-end loss), 0 otherwise; 0 once the run has diverged (non-finite loss) and 0 when the
    accuracy is within ``tolerance`` of ``chance`` (the majority-class accuracy of the task), so
    that a run that never learns does not read trainable against its own best.

    Example::

        >>> trainable_flag({"end_accuracy": 0.9, "end_loss": 0.3}, [{"end_accuracy": 0.97}], 0.05)
        0.0
        >>> trainable_flag({"end_accuracy": 0.12, "end_loss": 2.3}, [], 0.05, chance=0.1)
        0.0
    """
    key, sign = (("end_accuracy", 1.0) if "end_accuracy" in record else ("end_loss", -1.0))
    if key not in record:
        return float("nan")
    if not math.isfinite(record.get("end_loss", 0.0)):
        return 0.0  # diverged: no task is learnable any more
    if key == "end_accuracy" and chance is not None and record[key] <= chance + tolerance:
        return 0.0
    seen = [sign * h[key] for h in history if key in h] + [sign * record[key]]
    return float(sign * record[key] >= max(seen) - tolerance)
