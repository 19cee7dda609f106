"""Task kinds: how a base dataset becomes a sequence of tasks."""

from __future__ import annotations

from lightning_plasticity.data.base_datasets import BaseData
from lightning_plasticity.data.tasks.base import Split, TaskKind, TaskOptions
from lightning_plasticity.data.tasks.classes import ClassIncrementalTasks, ClassPairTasks
from lightning_plasticity.data.tasks.identity import IdentityTasks
from lightning_plasticity.data.tasks.inputs import PermutedInputTasks
from lightning_plasticity.data.tasks.labels import PermutedLabelTasks, RandomLabelTasks
from lightning_plasticity.data.tasks.regression import (
    RandomTargetTasks,
    SlowlyChangingRegressionTasks,
)

TASK_KINDS: dict[str, type[TaskKind]] = {
    cls.name: cls
    for cls in (
        PermutedLabelTasks,
        RandomLabelTasks,
        PermutedInputTasks,
        ClassPairTasks,
        ClassIncrementalTasks,
        RandomTargetTasks,
        SlowlyChangingRegressionTasks,
        IdentityTasks,
    )
}


def make_task_kind(
    name: str, data: BaseData, seed: int, num_tasks: int, options: TaskOptions
) -> TaskKind:
    """Build a task kind by name; raises ``ValueError`` listing the valid names."""
    if name not in TASK_KINDS:
        raise ValueError(f"Unknown task kind {name!r}. Choose one of: {', '.join(TASK_KINDS)}.")
    return TASK_KINDS[name](data, seed, num_tasks, options)


__all__ = [
    "TASK_KINDS",
    "ClassIncrementalTasks",
    "ClassPairTasks",
    "IdentityTasks",
    "PermutedInputTasks",
    "PermutedLabelTasks",
    "RandomLabelTasks",
    "RandomTargetTasks",
    "SlowlyChangingRegressionTasks",
    "Split",
    "TaskKind",
    "TaskOptions",
    "make_task_kind",
]
