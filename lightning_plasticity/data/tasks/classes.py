"""Task kinds that choose classes: ``class_pairs`` and ``class_incremental``."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from lightning_plasticity.data.seeding import generator
from lightning_plasticity.data.tasks.base import Split, TaskKind, TaskOptions


class ClassPairTasks(TaskKind):
    """Each task is a binary problem on two classes never paired before (Dohare et al. 2024).

    This is the construction of Dohare et al.'s continual ImageNet: all ``C (C - 1) / 2``
    unordered class pairs are shuffled once by ``seed`` and task ``t`` takes pair ``t``, so no
    two tasks share a pair. The first class of the (randomly ordered) pair becomes label 0 and
    the second label 1; the network has 2 outputs. Only examples of the two classes are used.
    """

    name = "class_pairs"
    indices_depend_on_task = True

    def __init__(self, data, seed: int, num_tasks: int, options: TaskOptions) -> None:  # noqa: ANN001
        super().__init__(data, seed, num_tasks, options)
        classes = torch.unique(data.train_y).tolist()
        if len(classes) < 2:
            raise ValueError(
                f"class_pairs needs at least 2 classes but dataset {data.name!r} has "
                f"{len(classes)} left. Use a dataset with more classes."
            )
        pairs = list(itertools.combinations(classes, 2))
        if num_tasks > len(pairs):
            raise ValueError(
                f"class_pairs can make at most {len(pairs)} tasks from {len(classes)} classes "
                f"(each pair of classes once), but num_tasks={num_tasks}. Lower num_tasks or use "
                "a dataset with more classes (e.g. cifar100 or an image_folder)."
            )
        gen = generator(seed, self.name)
        order = torch.randperm(len(pairs), generator=gen)
        flips = torch.randint(0, 2, (len(pairs),), generator=gen)
        self.pairs = [pairs[i][::-1] if f else pairs[i] for i, f in zip(order.tolist(),
                                                                        flips.tolist())]

    @property
    def num_outputs(self) -> int:
        return 2

    def pair(self, task_id: int) -> tuple[int, int]:
        return self.pairs[task_id % len(self.pairs)]

    def example_indices(self, task_id: int, split: Split) -> Tensor:
        a, b = self.pair(task_id)
        y = self.labels(split)
        return self.cached(("idx", task_id, split),
                           lambda: torch.nonzero((y == a) | (y == b)).flatten())

    def apply(self, x: Tensor, y: Tensor, idx: Tensor, task_id: int, split: Split) -> tuple[
        Tensor, Tensor
    ]:
        return x, (y == self.pair(task_id)[1]).long()


class ClassIncrementalTasks(TaskKind):
    """Classes are added over time (Dohare et al. 2024's class-incremental CIFAR-100).

    The classes are put in a random order drawn from ``seed``; task ``t`` trains on all examples
    of the first ``min(C, (t + 1) * classes_per_task)`` classes, with their original labels and a
    ``C``-way output layer. Once every class is in, later tasks repeat the full problem.
    """

    name = "class_incremental"
    indices_depend_on_task = True

    def __init__(self, data, seed: int, num_tasks: int, options: TaskOptions) -> None:  # noqa: ANN001
        super().__init__(data, seed, num_tasks, options)
        if options.classes_per_task < 1:
            raise ValueError(
                f"classes_per_task must be >= 1, got {options.classes_per_task}.")
        assert data.num_classes is not None
        self.class_order = torch.randperm(data.num_classes, generator=generator(seed, self.name))

    def classes(self, task_id: int) -> Tensor:
        assert self.data.num_classes is not None
        k = min(self.data.num_classes, (task_id + 1) * self.options.classes_per_task)
        return self.class_order[:k]

    def example_indices(self, task_id: int, split: Split) -> Tensor:
        classes, y = self.classes(task_id), self.labels(split)
        return self.cached(("idx", task_id, split),
                           lambda: torch.nonzero(torch.isin(y, classes)).flatten())
