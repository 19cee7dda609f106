"""Task events: ``on_task_start`` / ``on_task_end`` for the module and every callback.

Lightning has no notion of a task. :class:`ContinualDataModule` makes one Lightning epoch (or
``epochs_per_task`` epochs) one task, and this callback, which the data module adds to the trainer,
turns epoch boundaries into task events and logs the per-task metrics.

Order at a switch from task ``t`` to ``t + 1`` (on every rank)::

    last training batch of t -> validation of t -> LightningModule.on_train_epoch_end
    -> on_task_end(t): data module bookkeeping, LightningModule, callbacks in list order
    -> on_train_epoch_start -> on_task_start(t + 1): data module, LightningModule, callbacks
    -> first training batch of t + 1

Any object may take part by defining ``on_task_start(trainer, pl_module, task_id)`` and/or
``on_task_end(trainer, pl_module, task_id)``; it does not have to subclass anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy
from typing_extensions import override

from lightning_plasticity.core.layers import get_module
from lightning_plasticity.core.record import first_tensor
from lightning_plasticity.data.task_progress import TaskProgress

if TYPE_CHECKING:
    from lightning_plasticity.data.datamodule import ContinualDataModule


def _datamodule(trainer: pl.Trainer) -> ContinualDataModule | None:
    # Duck-typed (a task stream owns a TaskProgress): no run-time import of the data module,
    # which imports this file.
    dm = trainer.datamodule
    return dm if isinstance(getattr(dm, "progress", None), TaskProgress) else None


def dispatch_task_event(trainer: pl.Trainer, pl_module: pl.LightningModule, event: str,
                        task_id: int) -> None:
    """Call ``event`` on the LightningModule and then on every callback that defines it."""
    for target in [pl_module, *trainer.callbacks]:
        hook = getattr(target, event, None)
        if callable(hook):
            hook(trainer, pl_module, task_id)


def _accuracy(logits: Tensor, target: Any) -> Tensor | None:
    """Accuracy of ``(..., C)`` logits on integer targets of shape ``(...)``, else None."""
    if not isinstance(target, Tensor) or target.is_floating_point() or logits.dim() < 2 or \
            tuple(logits.shape[:-1]) != tuple(target.shape):
        return None
    return multiclass_accuracy(logits.detach().reshape(-1, logits.shape[-1]), target.reshape(-1),
                               num_classes=logits.shape[-1], average="micro",
                               validate_args=False)


def _loss_and_logits(outputs: Any) -> tuple[Tensor | None, Tensor | None]:
    if isinstance(outputs, Tensor):
        return outputs.detach(), None
    if isinstance(outputs, dict):
        loss = outputs.get("loss")
        logits = outputs.get("logits")
        return (loss.detach() if isinstance(loss, Tensor) else None,
                logits if isinstance(logits, Tensor) else None)
    return None, None


class TaskEventDispatcher(Callback):
    """Fires task events at task boundaries and logs ``task/*`` metrics.

    Added automatically by :class:`ContinualDataModule` during ``fit``; it has no state of its
    own (the data module's ``state_dict`` holds the task progress).

    Training accuracy comes from the ``"logits"`` a ``training_step`` returns, or, for a step
    that returns only its loss, from the output of the module's head (the last trainable layer
    its loss calls, found once at the start of fit by one recorded pass of the loss on a probe
    batch, without side effects) captured by a forward hook during the step.

    Example::

        >>> import tempfile
        >>> from lightning.pytorch import Callback, Trainer
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import ContinualClassifier
        >>> class ResetHead(Callback):
        ...     def __init__(self):
        ...         self.tasks = []
        ...     def on_task_start(self, trainer, pl_module, task_id):
        ...         pl_module.network.head.reset_parameters()
        ...         self.tasks.append(task_id)
        >>> cb = ResetHead()
        >>> dm = ContinualDataModule("digits", num_tasks=2, steps_per_task=2, batch_size=16,
        ...                          val_size=32)
        >>> trainer = Trainer(callbacks=[cb], max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp())
        >>> trainer.fit(ContinualClassifier(), datamodule=dm)
        >>> cb.tasks, [int(h["task"]) for h in dm.task_history]
        ([0, 1], [0, 1])
    """

    def __init__(self) -> None:
        self._head_output: Tensor | None = None
        self._handle: Any = None
        self._started_epoch: int | None = None
        self._diverged = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up_after_resume(trainer, pl_module)
        self._hook_head(trainer, pl_module)

    def _catch_up_after_resume(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fire the task events Lightning skips when it resumes at an epoch's last batch.

        A checkpoint written after the last batch of an epoch (``every_n_train_steps`` at a task
        boundary) resumes in the *next* epoch without calling the finished epoch's
        ``on_train_epoch_end`` or the new epoch's ``on_train_epoch_start``: the task would never
        end or start. The data module's state says so (its last recorded batch completed the
        previous epoch's task, which has no history record yet); end that task and start the
        new one here, exactly as the epoch hooks would have.
        """
        dm = _datamodule(trainer)
        epoch = trainer.current_epoch
        progress = dm.progress if dm is not None else None
        if progress is None or progress.epoch != epoch - 1 or \
                not dm.task_completed_in_epoch(progress.epoch) or progress.has_ended(dm.task_id):
            return
        progress.forget_resume()
        self._end_task(trainer, pl_module, dm)
        if epoch % dm.epochs_per_task == 0 and dm.task_of_epoch(epoch) < dm.num_tasks:
            self._start_task(trainer, pl_module, dm, epoch)
            self._started_epoch = epoch

    def _hook_head(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = _datamodule(trainer)
        if dm is None or dm.is_regression or self._handle is not None:
            return
        from lightning_plasticity.callbacks.probe import (
            find_head,
            measurement_context,
            record_loss_pass,
        )

        try:
            with measurement_context(pl_module, trainer):
                batch = dm.probe_batch(2, device=pl_module.device)
                name = find_head(record_loss_pass(pl_module, batch))
        except Exception:  # the step's own "logits" (if any) remain the only source
            return
        head = get_module(pl_module, name)

        def capture(module: nn.Module, args: Any, output: Any) -> None:
            out = first_tensor(output)
            if out is not None:
                self._head_output = out.detach()

        self._handle = head.register_forward_hook(capture)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.teardown(trainer, pl_module, "fit")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle, self._head_output = None, None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._head_output = None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = _datamodule(trainer)
        epoch = trainer.current_epoch
        if dm is None or epoch % dm.epochs_per_task != 0 or epoch == self._started_epoch:
            return
        self._start_task(trainer, pl_module, dm, epoch)

    @staticmethod
    def _start_task(trainer: pl.Trainer, pl_module: pl.LightningModule,
                    dm: ContinualDataModule, epoch: int) -> None:
        task_id = dm.task_of_epoch(epoch)
        dm.progress.start_task(task_id)
        dispatch_task_event(trainer, pl_module, "on_task_start", task_id)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        dm = _datamodule(trainer)
        if dm is None:
            return
        loss, logits = _loss_and_logits(outputs)
        if logits is None:
            logits = self._head_output
        elif self._handle is not None:
            # The step returns its logits: the head hook is not needed on the hot path.
            self.teardown(trainer, pl_module, "fit")
        accuracy = None
        target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) >= 2 else None
        if logits is not None and not dm.is_regression:
            accuracy = _accuracy(logits, target)
        if loss is not None:
            dm.progress.record_batch(trainer.current_epoch, batch_idx, loss, accuracy)
            if not self._diverged and not bool(torch.isfinite(loss).all()):
                self._diverged = True
                rank_zero_warn(
                    f"The training loss is {float(loss)} at step {trainer.global_step} (task "
                    f"{dm.task_id}): the run has diverged; task metrics from here on are not "
                    "meaningful (task/trainable is 0). Lower the learning rate, or check the "
                    "inputs and the loss.")
        # self.log costs about a millisecond a call: only call it on steps the loggers write.
        if not getattr(trainer._logger_connector, "should_update_logs", True):
            return
        pl_module.log("task/id", float(dm.task_id), on_step=True, on_epoch=False)
        # Over ranks, so that the step values describe the global batch, not rank 0's shard.
        if accuracy is not None:
            pl_module.log("task/train_accuracy", accuracy, on_step=True, on_epoch=False,
                          sync_dist=True)
        if loss is not None:
            pl_module.log("task/train_loss", loss, on_step=True, on_epoch=False, sync_dist=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = _datamodule(trainer)
        # A task cut short (max_steps, early stopping) does not end: its resume will end it.
        if dm is None or not dm.task_completed_in_epoch(trainer.current_epoch):
            return
        self._end_task(trainer, pl_module, dm)

    @staticmethod
    def _end_task(trainer: pl.Trainer, pl_module: pl.LightningModule,
                  dm: ContinualDataModule) -> None:
        task_id = dm.task_id
        # Every rank reaches this point at the same epoch with the same number of batches, so
        # the collectives are safe and every rank computes the same metrics.
        record = dm.end_task_record(trainer.global_step)
        for name, value in record.items():
            if name not in ("task", "global_step"):
                pl_module.log(f"task/{name}", value, on_step=False, on_epoch=True)
        dm.progress.end_task(record)
        dispatch_task_event(trainer, pl_module, "on_task_end", task_id)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}


__all__ = ["TaskEventDispatcher", "dispatch_task_event"]
