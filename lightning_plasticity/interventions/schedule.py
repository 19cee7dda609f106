"""The base classes every intervention callback shares: seeding, schedule, resume, logging.

* :class:`SeededIntervention`: every random draw comes from :meth:`~SeededIntervention.seed_for`
  (a hash of a base seed and of where the draw happens), never from the global RNG streams, so
  adding an intervention does not change the data order or dropout masks of a run, a resumed run
  draws the same values, and under DDP every rank modifies its replica identically.
* :class:`ScheduledIntervention`: acts at task starts and/or every ``n`` optimizer steps, never
  twice for one task or step (also across a resume).
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_plasticity.callbacks.log_now import log_now
from lightning_plasticity.core.process_group import destroy_process_group_at_exit
from lightning_plasticity.core.schedule import StepSchedule, TaskSchedule
from lightning_plasticity.data.seeding import derive_seed

__all__ = ["INTERVENTION_PREFIX", "ScheduledIntervention", "SeededIntervention"]

#: Metrics of the interventions are logged as ``f"{INTERVENTION_PREFIX}/{name}"``.
INTERVENTION_PREFIX = "intervention"


class SeededIntervention(Callback):
    """Base of the intervention callbacks: reproducible seeds, logging, one-time notices.

    Every random draw of an intervention comes from :meth:`seed_for`, a hash of a base seed and
    of where it happens (event, step, layer), never from the global RNG streams, so adding an
    intervention does not change the data order or dropout masks of a run, and a resumed run
    draws the same values. The base seed is ``seed``, else the torch seed of rank 0 at fit start
    (set by ``seed_everything``), broadcast so that every rank modifies its replica identically.

    Args:
        seed: The base seed, or ``None``.

    Example:
        >>> cb = SeededIntervention(seed=3)
        >>> cb.seed_for("task_start", 10) == cb.seed_for("task_start", 10)
        True
        >>> cb.seed_for("task_start", 10) == cb.seed_for("task_start", 11)
        False
    """

    #: names this intervention's draws in :meth:`seed_for`
    seed_key = "intervention"

    def __init__(self, *, seed: int | None = None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{type(self).__name__}: seed must be an int or None, got {seed!r}.")
        self.seed = seed
        #: the resolved base seed (set at fit start)
        self.base_seed: int | None = seed
        self._warned: set[str] = set()

    def seed_for(self, *keys: int | str) -> int:
        """The seed of one draw: a hash of the base seed, :attr:`seed_key` and ``keys``."""
        if self.base_seed is None:
            raise RuntimeError(f"{type(self).__name__}: the base seed is set at fit start; "
                               "pass seed= to use seed_for before that.")
        return derive_seed(self.base_seed, self.seed_key, *keys)

    def _resolve_seed(self, trainer: pl.Trainer) -> None:
        if self.base_seed is None:
            local = torch.initial_seed() & (2**63 - 1)
            self.base_seed = int(trainer.strategy.broadcast(local, src=0))

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"{type(self).__name__}: {message}.", stacklevel=3)

    @staticmethod
    def log_now(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Log under ``intervention/`` straight to the loggers at the current step."""
        log_now(trainer, {f"{INTERVENTION_PREFIX}/{k}": float(v) for k, v in metrics.items()})

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:  # every worker, spawned ones included
            destroy_process_group_at_exit()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve_seed(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"base_seed": self.base_seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("base_seed") is not None:
            self.base_seed = int(state_dict["base_seed"])


class ScheduledIntervention(SeededIntervention):
    """Base of interventions applied at task starts and/or every ``n`` optimizer steps.

    Subclasses implement :meth:`apply`. Task ``0`` is never intervened on (it starts from a
    fresh initialisation), nor is a task twice (a run resumed inside a task whose start was
    already handled does not repeat it). The step schedule acts whenever ``trainer.global_step``
    reaches or passes a multiple of ``every_n_train_steps`` (a manual-optimization module that
    steps two optimizers per batch advances the global step by two), at most once per step.

    Args:
        on_task_start: apply at the start of every ``every_n_tasks``-th task after the first.
        every_n_train_steps: also apply after every this many optimizer steps.
        every_n_tasks: task frequency.
        seed: see :class:`SeededIntervention`.
    """

    def __init__(self, *, on_task_start: bool = True, every_n_train_steps: int | None = None,
                 every_n_tasks: int = 1, seed: int | None = None) -> None:
        super().__init__(seed=seed)
        name = type(self).__name__
        if every_n_train_steps is not None and (isinstance(every_n_train_steps, bool)
                                                or every_n_train_steps < 1):
            raise ValueError(f"{name}: every_n_train_steps must be >= 1 or None, got "
                             f"{every_n_train_steps!r}.")
        if every_n_tasks < 1:
            raise ValueError(f"{name}: every_n_tasks must be >= 1, got {every_n_tasks}.")
        if not on_task_start and every_n_train_steps is None:
            raise ValueError(f"{name} would never act: set on_task_start=True or "
                             "every_n_train_steps.")
        self.at_task_start = on_task_start
        self.every_n_train_steps, self.every_n_tasks = every_n_train_steps, every_n_tasks
        #: how many times the intervention was applied
        self.num_applied = 0
        #: the seed of the latest application
        self.last_seed: int | None = None
        self._tasks = TaskSchedule(every_n_tasks, after=0)  # task 0 starts fresh
        self._steps = StepSchedule(every_n_train_steps)
        self._restored = False

    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: str,
              batch: Any) -> bool | None:
        """Intervene; ``event`` is ``"task_start"`` or ``"step"`` (with the current batch).

        Returns:
            ``False`` if nothing could be done this time (not counted in :attr:`num_applied`).
        """
        raise NotImplementedError

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._state_key_args())

    def _state_key_args(self) -> dict[str, Any]:
        return {"every_n_train_steps": self.every_n_train_steps,
                "every_n_tasks": self.every_n_tasks}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if not self._restored:  # a new run (not a resume): its tasks and steps start over
            self._tasks.reset()
            self._steps.last = -1
        self._restored = False
        if self.every_n_train_steps is None and not hasattr(trainer.datamodule, "task_id"):
            self._warn_once("on_task_start needs a ContinualDataModule (or another source of "
                            "task events); without one nothing happens. Set "
                            "every_n_train_steps to act on steps")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a checkpoint's training state is restored: the step counting starts here.
        self._steps.start(trainer.global_step)

    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                      task_id: int) -> None:
        """Task event (see :mod:`lightning_plasticity.data.task_events`)."""
        if self.at_task_start and self._tasks.due(task_id) and \
                self.apply(trainer, pl_module, "task_start", None) is not False:
            self.num_applied += 1

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._steps.due(trainer.global_step) and \
                self.apply(trainer, pl_module, "step", batch) is not False:
            self.num_applied += 1

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "num_applied": self.num_applied,
                "last_task": self._tasks.last, "last_step": self._steps.last}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_applied = int(state_dict.get("num_applied", 0))
        self._tasks.load_state_dict({"last": state_dict.get("last_task", 0)})
        self._steps.load_state_dict({"last": state_dict.get("last_step", -1)})
        self._restored = True
