"""Continual task streams as one task-switching LightningDataModule."""

from lightning_plasticity.data.base_datasets import (
    DATASETS,
    BaseData,
    DatasetOptions,
    load_base_data,
)
from lightning_plasticity.data.datamodule import ContinualDataModule
from lightning_plasticity.data.task_events import TaskEventDispatcher, dispatch_task_event
from lightning_plasticity.data.tasks import TASK_KINDS, TaskKind, TaskOptions

__all__ = [
    "DATASETS",
    "TASK_KINDS",
    "BaseData",
    "ContinualDataModule",
    "DatasetOptions",
    "TaskEventDispatcher",
    "TaskKind",
    "TaskOptions",
    "dispatch_task_event",
    "load_base_data",
]
