"""When a scheduled callback acts: every ``n`` tasks and every ``n`` optimizer steps.

One schedule for measurements and interventions alike (no Lightning import; the callbacks feed
it the task ids and global steps they see).
"""

from __future__ import annotations

from typing import Any

__all__ = ["StepSchedule", "TaskSchedule"]


class TaskSchedule:
    """Due at every ``every_n`` -th task, once per task, after ``after`` (also across a resume).

    Example::

        >>> s = TaskSchedule(every_n=2, after=0)  # interventions: never on task 0
        >>> [t for t in [0, 1, 2, 2, 3, 4] if s.due(t)]
        [2, 4]
    """

    def __init__(self, every_n: int = 1, after: int = -1) -> None:
        self.every_n, self.after = every_n, after
        self.last = after

    def due(self, task_id: int) -> bool:
        if task_id <= self.last or task_id % self.every_n:
            return False
        self.last = task_id
        return True

    def reset(self) -> None:
        self.last = self.after

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last = int(state.get("last", self.after))


class StepSchedule:
    """Due whenever the global step reaches or passes a multiple of ``every_n``, once per step.

    Several batches share one global step under gradient accumulation, and a manual-optimization
    module that steps two optimizers per batch advances it by two, so "the step is a multiple"
    would act twice or never; "a multiple was crossed since the last batch" acts exactly once.

    Example::

        >>> s = StepSchedule(every_n=3)
        >>> [step for step in [1, 2, 2, 4, 6, 6, 8, 10] if s.due(step)]
        [4, 6, 10]
    """

    def __init__(self, every_n: int | None) -> None:
        self.every_n = every_n
        self.seen = 0  # the step at the latest batch
        self.last = -1  # the latest step acted on

    def start(self, step: int) -> None:
        """Start counting at ``step`` (the start of fit, after a checkpoint is restored)."""
        self.seen = step

    def due(self, step: int) -> bool:
        n, previous = self.every_n, self.seen
        self.seen = step
        if n is None or step <= previous or step == self.last or step // n <= previous // n:
            return False
        self.last = step
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last = int(state.get("last", -1))
