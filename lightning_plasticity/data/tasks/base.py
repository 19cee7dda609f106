"""The task-kind interface: which examples a task uses and how it changes a batch.

A task kind is a pure function of ``(seed, task_id)``: everything random is drawn from
:func:`lightning_plasticity.data.seeding.generator`, so the same task is rebuilt identically in any
process. Batches are changed in the main process, after the transfer to the device, never inside
DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from lightning_plasticity.data.base_datasets import BaseData

Split = Literal["train", "val"]


@dataclass(frozen=True)
class TaskOptions:
    """Options of the task kinds that use them (see :class:`ContinualDataModule`)."""

    classes_per_task: int = 2
    target_mean: float = 0.0
    target_scale: float = 1.0
    target_dim: int = 1
    num_slow_bits: int = 15


class TaskKind:
    """Base class of task kinds. Subclasses set ``name`` and override what they change.

    Args:
        data: the base dataset.
        seed: the run's seed; task ``t`` is a pure function of ``(seed, t)``.
        num_tasks: how many tasks the stream has (some kinds check they can make that many).
        options: options for the kinds that use them.
    """

    name: ClassVar[str]
    #: whether the set of examples differs between tasks (it does for class-based kinds)
    indices_depend_on_task: ClassVar[bool] = False
    regression: ClassVar[bool] = False

    def __init__(self, data: BaseData, seed: int, num_tasks: int, options: TaskOptions) -> None:
        self.data = data
        self.seed = seed
        self.num_tasks = num_tasks
        self.options = options
        self._cache: dict[object, object] = {}
        if self.requires_classes and data.is_regression:
            raise ValueError(
                f"Task kind {self.name!r} needs a classification dataset, but {data.name!r} is a "
                "regression set. Use task='random_targets' or 'identity', or a labelled dataset."
            )

    requires_classes: ClassVar[bool] = True

    @property
    def num_outputs(self) -> int:
        """Size of the network's output layer for this stream."""
        if self.data.num_classes is not None:
            return self.data.num_classes
        return int(self.data.train_y.shape[1])

    @property
    def is_regression(self) -> bool:
        return self.regression or self.data.is_regression

    def labels(self, split: Split) -> Tensor:
        return self.data.train_y if split == "train" else self.data.val_y

    def split_size(self, split: Split) -> int:
        return int(self.labels(split).shape[0])

    def example_indices(self, task_id: int, split: Split) -> Tensor:
        """Indices into the base split of the examples task ``task_id`` may use."""
        return torch.arange(self.split_size(split))

    def apply(self, x: Tensor, y: Tensor, idx: Tensor, task_id: int, split: Split) -> tuple[
        Tensor, Tensor
    ]:
        """Turn a batch of normalised base inputs and targets into task ``task_id``'s batch."""
        return x, y

    def cached(self, key: object, build):  # noqa: ANN001, ANN201 - tiny memo helper
        """Memoise per-task tables; bounded so a stream of thousands of tasks stays small."""
        if key not in self._cache:
            if len(self._cache) >= 16:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = build()
        return self._cache[key]

    def on_device(self, key: object, tensor: Tensor, device: torch.device) -> Tensor:
        """A per-task tensor on ``device``, moved once and cached."""
        return self.cached((key, str(device)), lambda: tensor.to(device))
