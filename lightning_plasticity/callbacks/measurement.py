"""``MeasurementCallback``: the shell every measurement callback shares.

A subclass implements :meth:`MeasurementCallback.compute` (call a pure function of
:mod:`lightning_plasticity.measures`, return scalars). This base class decides *when* to measure,
picks the probe batch, guards against side effects, logs, keeps the per-task history for
``state_dict``, and turns failures into one warning instead of a crashed run.

Schedule: with a :class:`~lightning_plasticity.data.ContinualDataModule`, at task starts and/or
ends (every ``every_n_tasks``-th task). Without task events, at the start of fit and at the end of
every training epoch (said once in a warning). In both cases also every ``every_n_train_steps``
optimizer steps when given.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_plasticity.callbacks.log_now import log_now
from lightning_plasticity.callbacks.probe import (
    MeasurementSkipped,
    ModuleLossFn,
    ProbeSource,
    find_head,
    loss_closure,
    measurement_context,
    module_loss,
    record_loss_pass,
    select_probe_batch,
)
from lightning_plasticity.core.process_group import destroy_process_group_at_exit
from lightning_plasticity.core.record import HeadOutput
from lightning_plasticity.core.reduction import Reducer
from lightning_plasticity.core.schedule import StepSchedule, TaskSchedule

__all__ = ["MeasurementCallback", "MeasurementSkipped"]


class MeasurementCallback(Callback):
    """Base class: schedule, probe batch, no side effects, logging, history and resume.

    Args:
        probe_size: examples in the probe batch (split across ranks under DDP).
        loss_fn: ``loss_fn(pl_module, batch) -> loss``; default: the module's ``plasticity_loss``
            or its own ``training_step`` (see :func:`.probe.module_loss`; a
            manual-optimization module needs one of the first two).
        on_task_start: measure at the start of every ``every_n_tasks``-th task (the seeds'
            measurement point).
        on_task_end: measure at the end of every ``every_n_tasks``-th task. Without a
            ContinualDataModule, either flag means: at the start of fit and at the end of every
            training epoch.
        every_n_train_steps: also measure after every this many optimizer steps.
        every_n_tasks: task frequency of the task-event measurements.
    """

    #: metric names are logged as ``f"{prefix}/{name}"``
    prefix = "curvature"
    #: under DDP, measure this rank's shard of the probe (False: every rank the whole probe)
    shard_probe = True
    #: whether the measurement needs a probe batch and the module's loss at all
    needs_probe = True

    def __init__(
        self,
        *,
        probe_size: int = 256,
        loss_fn: ModuleLossFn | None = None,
        on_task_start: bool = True,
        on_task_end: bool = False,
        every_n_train_steps: int | None = None,
        every_n_tasks: int = 1,
    ) -> None:
        name = type(self).__name__
        if probe_size < 1:
            raise ValueError(f"{name}: probe_size must be >= 1, got {probe_size}.")
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"{name}: every_n_train_steps must be >= 1 or None, got "
                             f"{every_n_train_steps}.")
        if every_n_tasks < 1:
            raise ValueError(f"{name}: every_n_tasks must be >= 1, got {every_n_tasks}.")
        if not (on_task_start or on_task_end or every_n_train_steps):
            raise ValueError(f"{name} would never measure: set on_task_start, on_task_end or "
                             "every_n_train_steps.")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"{name}: loss_fn must be callable(pl_module, batch).")
        self.probe_size, self.loss_fn = probe_size, loss_fn
        self.at_task_start, self.at_task_end = on_task_start, on_task_end
        self.every_n_train_steps, self.every_n_tasks = every_n_train_steps, every_n_tasks
        #: one dict per measurement: ``task``, ``step``, ``event`` and the metrics
        self.history: list[dict[str, Any]] = []
        self._warned: set[str] = set()
        self._probe_source = ProbeSource(probe_size)
        self._head: str | None = None
        self._measured_at_fit_start = False
        self._starts, self._ends = TaskSchedule(every_n_tasks), TaskSchedule(every_n_tasks)
        self._steps = StepSchedule(every_n_train_steps)
        self._restored = False
        #: wall seconds from the end of the previous measurement to the start of this one
        #: (the training the measurement interrupts), None before the second measurement
        self.interval_seconds: float | None = None
        self._last_end: float | None = None

    @property
    def cost_key(self) -> str:
        """The logged cost metric: ``f"{prefix}/measure_seconds/{name}"``, the name in snake
        case without ``Callback`` (``curvature/measure_seconds/hessian_rank``)."""
        name = re.sub(r"Callback$", "", type(self).__name__)
        snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
        return f"{self.prefix}/measure_seconds/{snake}"

    # ------------------------------------------------------------------ to implement
    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                reduce: Callable[[Tensor], Tensor] | None) -> Any:
        """Measure on this rank's probe shard.

        Returns a measure's result (or a list of them): its ``scalars()`` are the logged keys
        and its ``spectra()``, if any, 1-D tensors that go to the history and to wandb as
        histograms. A plain dict of scalars (spectra under ``"spectrum:<name>"``) also works.
        Statistics are reduced across ranks before the result is formed (``reduce``: the
        cross-rank mean; :meth:`reducer`: the reduction each statistic declares).
        """
        raise NotImplementedError

    @staticmethod
    def metrics_of(out: Any) -> dict[str, Any]:
        """The flat metrics of what :meth:`compute` returned (see there)."""
        if isinstance(out, dict):
            return out
        metrics: dict[str, Any] = {}
        for result in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(result, dict):
                metrics.update(result)
                continue
            metrics.update(result.scalars())
            spectra = getattr(result, "spectra", None)
            if callable(spectra):
                metrics.update({f"spectrum:{k}": v for k, v in spectra().items()})
        return metrics

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Cheap, collective-free checks; raise :class:`MeasurementSkipped` to skip."""
        loss = self.loss(pl_module, batch)
        if not torch.isfinite(loss).all():
            raise MeasurementSkipped(f"the loss on the probe batch is {loss.item()}")

    # ------------------------------------------------------------------ helpers
    def loss(self, pl_module: pl.LightningModule, batch: Any) -> Tensor:
        return module_loss(pl_module, batch, self.loss_fn)

    def module_loss_fn(self) -> Callable[[Any, Any], Tensor]:
        """``(module, batch) -> loss``: the module's own loss, in the form the measures take
        (``loss_fn(model, batch)``), also on a copy of the module."""
        return loss_closure(self.loss_fn)

    def head_output(self, pl_module: pl.LightningModule, batch: Any) -> HeadOutput:
        """``pl_module`` as a model whose output is its head's, for measures of ``model(batch)``."""
        return HeadOutput(pl_module, self.module_loss_fn(), self.head_name(pl_module, batch))

    def head_name(self, pl_module: pl.LightningModule, batch: Any) -> str:
        """The layer whose output the loss reads: found once by one recorded loss pass."""
        if self._head is None:
            self._head = find_head(record_loss_pass(pl_module, batch, self.loss_fn))
        return self._head

    @property
    def state_key(self) -> str:
        # Lightning reads it for every hook call (profiler names), so compute it once: the
        # arguments it is built from are fixed after __init__.
        if getattr(self, "_cached_state_key", None) is None:
            self._cached_state_key = self._generate_state_key(**self._state_key_args())
        return self._cached_state_key

    def _state_key_args(self) -> dict[str, Any]:
        return {"probe_size": self.probe_size, "every_n_train_steps": self.every_n_train_steps}

    def _note_once(self, message: str) -> None:
        """A one-time notice about a choice made for the user (not a failure)."""
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"{type(self).__name__}: {message}.", stacklevel=2)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"{type(self).__name__}: {message}. Training goes on.", stacklevel=2)

    @staticmethod
    def _reduce_fn(trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
        if trainer.world_size <= 1:
            return None

        def reduce(t: Tensor) -> Tensor:
            # Lightning's DDP reduce works in place: never hand it a caller's tensor.
            return trainer.strategy.reduce(t.detach().clone(), reduce_op="mean")

        return reduce

    @staticmethod
    def reducer(trainer: pl.Trainer) -> Reducer | None:
        """``reducer(t, op)``: all-reduce with the op a statistic declares (None on one
        process); for :func:`~lightning_plasticity.core.reduction.reduce_stats`."""
        if trainer.world_size <= 1:
            return None
        return lambda t, op: trainer.strategy.reduce(t.detach().clone(), reduce_op=op)

    @staticmethod
    def _all_ranks_ok(trainer: pl.Trainer, ok: bool) -> bool:
        if trainer.world_size <= 1:
            return ok
        return bool(trainer.strategy.reduce_boolean_decision(ok, all=True))

    # ------------------------------------------------------------------ the measurement
    def measure_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: str,
                    task_id: int) -> dict[str, Any] | None:
        """Measure, log and record; every rank must call it at the same point.

        The record and the log carry :attr:`cost_key`: the wall seconds this measurement took
        (probe selection, checks, compute), so users see what they pay.
        """
        started = time.perf_counter()
        if self._last_end is not None:
            self.interval_seconds = started - self._last_end
        try:
            return self._measure(trainer, pl_module, event, task_id, started)
        finally:
            self._last_end = time.perf_counter()

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: str,
                 task_id: int, started: float) -> dict[str, Any] | None:
        error: str | None = None
        batch = None
        try:
            with measurement_context(pl_module, trainer):
                # Built inside the context: under inference_mode it would be an inference tensor.
                if self.needs_probe:
                    batch = select_probe_batch(trainer, pl_module, self.probe_size,
                                               self._probe_source, sharded=self.shard_probe,
                                               note=self._note_once)
                self.check(trainer, pl_module, batch)
        except MeasurementSkipped as err:
            error = str(err)
        except Exception as err:
            # Raised by the module's own loss on the probe batch (or the probe itself).
            error = (f"{type(err).__name__}: {err}; if the module's loss cannot run on a probe "
                     "batch outside training, define plasticity_loss(batch) on it or pass "
                     "loss_fn=callable(pl_module, batch)")
        # Agree before any collective so that no rank waits on one that skipped.
        if not self._all_ranks_ok(trainer, error is None):
            reason = error or "another rank could not measure"
            self._warn_once(f"skipped the measurement ({reason})")
            return None
        try:
            with measurement_context(pl_module, trainer):
                metrics = self.metrics_of(
                    self.compute(trainer, pl_module, batch, self._reduce_fn(trainer)))
        except Exception as err:
            # These come from checks made before any collective or from a local eigensolve of
            # an all-reduced matrix: identical on every rank, so every rank skips together.
            same_on_all_ranks = isinstance(err, (MeasurementSkipped, ValueError,
                                                 FloatingPointError, torch.linalg.LinAlgError))
            if trainer.world_size > 1 and not same_on_all_ranks:
                # Maybe on this rank only, between collectives: going on could leave another
                # rank waiting forever, so fail loudly instead.
                raise
            self._warn_once(f"skipped the measurement ({type(err).__name__}: {err})")
            return None
        spectra = {f"{self.prefix}/{k.split(':', 1)[1]}": v.detach().cpu()
                   for k, v in list(metrics.items()) if k.startswith("spectrum:")}
        scalars = {f"{self.prefix}/{k}": float(v) for k, v in metrics.items()
                   if not k.startswith("spectrum:")}
        # This rank's wall time (no collective: one here would have to match on every rank
        # even where a rank's measurement failed alone).
        scalars[self.cost_key] = time.perf_counter() - started
        bad = [k for k, v in scalars.items() if not math.isfinite(v)]
        if bad:
            self._note_once(f"non-finite values ({', '.join(bad[:4])}"
                            f"{', ...' if len(bad) > 4 else ''}) are logged as such")
        log_now(trainer, scalars, spectra)
        record = {"task": task_id, "step": trainer.global_step, "event": event, **scalars,
                  **{k: v.tolist() for k, v in spectra.items()}}
        self.history.append(record)
        return record

    # ------------------------------------------------------------------ hooks
    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                      task_id: int) -> None:
        if self.at_task_start and self._starts.due(task_id):
            self.measure_now(trainer, pl_module, "task_start", task_id)

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                    task_id: int) -> None:
        if self.at_task_end and self._ends.due(task_id):
            self.measure_now(trainer, pl_module, "task_end", task_id)

    @staticmethod
    def _has_task_events(trainer: pl.Trainer) -> bool:
        return callable(getattr(trainer.datamodule, "probe_batch", None))

    def _task_id(self, trainer: pl.Trainer) -> int:
        if self._has_task_events(trainer):
            return int(getattr(trainer.datamodule, "task_id", 0) or 0)
        return trainer.current_epoch

    def _note_schedule(self) -> None:
        when = ["at the start of fit", "at the end of every training epoch"]
        if self.every_n_train_steps:
            when.append(f"every {self.every_n_train_steps} optimizer steps")
        self._note_once("no ContinualDataModule (no task events): measuring "
                        f"{', '.join(when[:-1])} and {when[-1]}")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._has_task_events(trainer):
            return
        self._probe_source.observe(batch)
        events = self.at_task_start or self.at_task_end
        if events and not self._measured_at_fit_start:
            self._measured_at_fit_start = True
            self._note_schedule()
            self.measure_now(trainer, pl_module, "fit_start", self._task_id(trainer))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:  # every worker, spawned ones included
            destroy_process_group_at_exit()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._restored:  # a new run (not a resume): its tasks and steps start over
            self._starts.reset()
            self._ends.reset()
            self._steps.last = -1
        self._restored = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steps.start(trainer.global_step)  # after a checkpoint is restored

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._has_task_events(trainer) or not (self.at_task_start or self.at_task_end):
            return
        self.measure_now(trainer, pl_module, "epoch_end", self._task_id(trainer))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._steps.due(trainer.global_step):
            if not self._has_task_events(trainer) and not (self.at_task_start or
                                                           self.at_task_end):
                self._note_schedule()
            self.measure_now(trainer, pl_module, "step", self._task_id(trainer))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history],
                "measured_at_fit_start": self._measured_at_fit_start,
                "schedule": {"task_start": self._starts.state_dict(),
                             "task_end": self._ends.state_dict(),
                             "step": self._steps.state_dict()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._measured_at_fit_start = bool(state_dict.get("measured_at_fit_start", False))
        schedule = state_dict.get("schedule", {})
        self._starts.load_state_dict(schedule.get("task_start", {}))
        self._ends.load_state_dict(schedule.get("task_end", {}))
        self._steps.load_state_dict(schedule.get("step", {}))
        self._restored = True
