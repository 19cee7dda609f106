"""``TaskProgressBar``: Lightning's TQDM bar that counts tasks, and a log line per finished task.

In a terminal the training bar reads ``task 12/50`` instead of ``Epoch 11`` and shows the last
task-end accuracy next to the loss. When standard output is not a terminal (CI logs, SLURM
files, ``nohup``) carriage-return bars would fill the file with half-drawn lines, so the bars
are off and one line per finished task is printed instead::

    task 12/50 done in 1.6 s: end accuracy 0.9344, online accuracy 0.8812, steps to target 35 \
(step 1200, 0:00:19 elapsed)
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from typing_extensions import override

__all__ = ["TaskProgressBar", "task_line"]

#: the task-history metrics a line shows, in this order, with their labels
_LINE_METRICS = (("end_accuracy", "end accuracy"), ("end_loss", "end loss"),
                 ("online_accuracy", "online accuracy"), ("steps_to_target", "steps to target"))


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def task_line(record: Mapping[str, Any], num_tasks: int | None, seconds: float | None = None,
              elapsed: float | None = None) -> str:
    """The line printed when a task ends, from its task-history record.

    Tasks are counted from 1 (task id ``t`` is ``task t+1/N``). Accuracy streams show end and
    online accuracy and the steps to the target (when reached); regression streams the end loss.

    Args:
        record: the task's record of ``ContinualDataModule.task_history``.
        num_tasks: the stream's number of tasks (None: unknown).
        seconds: wall seconds the task took.
        elapsed: wall seconds since the start of fit.

    Example::

        >>> task_line({"task": 11.0, "global_step": 1200.0, "end_accuracy": 0.93444,
        ...            "end_loss": 0.2, "online_accuracy": 0.88, "steps_to_target": 35.0},
        ...           num_tasks=50, seconds=1.62, elapsed=19.4)
        'task 12/50 done in 1.6 s: end accuracy 0.9344, online accuracy 0.8800, steps to target \
35 (step 1200, 0:00:19 elapsed)'
        >>> task_line({"task": 0.0, "end_loss": 0.5, "steps_to_target": float("nan")}, None)
        'task 1 done: end loss 0.5000'
    """
    task = int(record["task"]) + 1
    head = f"task {task}/{num_tasks}" if num_tasks else f"task {task}"
    head += " done" + (f" in {seconds:.1f} s" if seconds is not None else "")
    has_accuracy = isinstance(record.get("end_accuracy"), (int, float))
    parts = []
    for key, label in _LINE_METRICS:
        value = record.get(key)
        if key == "end_loss" and has_accuracy:
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(f"{label} {_fmt(float(value))}")
    tail = []
    if isinstance(record.get("global_step"), (int, float)):
        tail.append(f"step {int(record['global_step'])}")
    if elapsed is not None:
        tail.append(f"{timedelta(seconds=int(elapsed))} elapsed")
    line = f"{head}: {', '.join(parts)}" if parts else head
    return f"{line} ({', '.join(tail)})" if tail else line


class TaskProgressBar(TQDMProgressBar):
    """Lightning's TQDM progress bar in tasks, or one printed line per finished task.

    With a task stream (``ContinualDataModule``) the training bar is labelled ``task i/N``
    (counted from 1) and its postfix shows ``end_acc``, the last task-end accuracy (the end
    loss for regression). When the output is not a terminal, the bars are off and each
    finished task prints one line (:func:`task_line`) to standard output, flushed at once so
    that log files show progress as it happens. Only rank 0 draws or prints. Without a task
    stream it is Lightning's bar.

    Args:
        refresh_rate: update the bars every this many batches (as ``TQDMProgressBar``).
        process_position: as ``TQDMProgressBar``.
        leave: as ``TQDMProgressBar``.
        interactive: draw bars (True) or print one line per task (False); None: bars when
            standard output is a terminal.
        stream: where the task lines go (default ``sys.stdout`` at the time of printing).

    Example::

        >>> import io, tempfile
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.callbacks import TaskProgressBar
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import ContinualClassifier
        >>> dm = ContinualDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=2,
        ...                          batch_size=16, val_size=32)
        >>> out = io.StringIO()
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_model_summary=False,
        ...                   default_root_dir=tempfile.mkdtemp(),
        ...                   callbacks=[TaskProgressBar(interactive=False, stream=out)])
        >>> trainer.fit(ContinualClassifier(), datamodule=dm)
        >>> [line.split(" done")[0] for line in out.getvalue().splitlines()]
        ['task 1/2', 'task 2/2']
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False,
                 interactive: bool | None = None, stream: TextIO | None = None) -> None:
        if not isinstance(refresh_rate, int) or refresh_rate < 0:
            raise ValueError(f"TaskProgressBar: refresh_rate must be an int >= 0 (0 turns the "
                             f"bars off), got {refresh_rate!r}.")
        if interactive not in (None, True, False):
            raise ValueError(f"TaskProgressBar: interactive must be True, False or None (bars "
                             f"when stdout is a terminal), got {interactive!r}.")
        super().__init__(refresh_rate=refresh_rate, process_position=process_position,
                         leave=leave)
        self.interactive = interactive
        self.stream = stream
        self._fit_started: float | None = None
        self._task_started: float | None = None

    # ------------------------------------------------------------------ mode
    @property
    def draws_bars(self) -> bool:
        """Whether bars are drawn (else one line per finished task is printed)."""
        if self.interactive is not None:
            return self.interactive
        isatty = getattr(sys.stdout, "isatty", None)
        return bool(isatty and isatty())

    @property
    @override
    def is_enabled(self) -> bool:
        return super().is_enabled and self.draws_bars

    def _stream(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stdout

    # ------------------------------------------------------------------ task stream
    @staticmethod
    def _stream_of(trainer: pl.Trainer) -> Any:
        dm = trainer.datamodule
        return dm if callable(getattr(dm, "task_of_epoch", None)) else None

    @staticmethod
    def _last_end(dm: Any) -> tuple[str, float] | None:
        for record in reversed(getattr(dm, "task_history", None) or []):
            for key, short in (("end_accuracy", "end_acc"), ("end_loss", "end_loss")):
                value = record.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    return short, float(value)
        return None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._fit_started = time.perf_counter()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        dm = self._stream_of(trainer)
        if dm is None:
            super().on_train_epoch_start(trainer, *args)
            return
        # TQDMProgressBar's own reset, with the task instead of "Epoch i" (setting it after the
        # parent would draw "Epoch i" for a moment). From the epoch, not dm.task_id: the task
        # may not have started yet (hook order).
        task = int(dm.task_of_epoch(trainer.current_epoch))
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset()
        self.train_progress_bar.total = convert_inf(self.total_train_batches)
        self.train_progress_bar.initial = 0
        self.train_progress_bar.set_description(f"task {task + 1}/{dm.num_tasks}")

    @override
    def get_metrics(self, trainer: pl.Trainer,
                    pl_module: pl.LightningModule) -> dict[str, int | str | float | dict]:
        items = super().get_metrics(trainer, pl_module)
        last = self._last_end(self._stream_of(trainer))
        if last is not None:
            items[last[0]] = f"{last[1]:.3f}"
        return items

    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                      task_id: int) -> None:
        self._task_started = time.perf_counter()

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                    task_id: int) -> None:
        if self.draws_bars or not trainer.is_global_zero or self.refresh_rate == 0:
            return
        dm = self._stream_of(trainer)
        history = getattr(dm, "task_history", None) or []
        record = next((h for h in reversed(history) if int(h["task"]) == task_id),
                      {"task": task_id})
        now = time.perf_counter()
        line = task_line(record, getattr(dm, "num_tasks", None),
                         seconds=None if self._task_started is None else
                         now - self._task_started,
                         elapsed=None if self._fit_started is None else now - self._fit_started)
        # A closed or broken stream never stops training.
        with contextlib.suppress(OSError, ValueError):
            print(line, file=self._stream(), flush=True)
