"""Task kinds that change the labels: ``permuted_labels`` and ``random_labels``."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_plasticity.data.seeding import generator
from lightning_plasticity.data.tasks.base import Split, TaskKind


class PermutedLabelTasks(TaskKind):
    """Each task relabels the classes by a fresh permutation (Lewandowski et al. 2024).

    Task ``t`` maps class ``c`` to ``perm_t[c]`` with ``perm_t`` a uniformly random permutation
    drawn from ``(seed, t)``. Inputs are unchanged, so the features stay useful and only the
    read-out has to be relearned.
    """

    name = "permuted_labels"

    def permutation(self, task_id: int) -> Tensor:
        assert self.data.num_classes is not None
        n = self.data.num_classes
        return self.cached(("perm", task_id),
                           lambda: torch.randperm(n, generator=generator(self.seed, self.name,
                                                                         task_id)))

    def apply(self, x: Tensor, y: Tensor, idx: Tensor, task_id: int, split: Split) -> tuple[
        Tensor, Tensor
    ]:
        perm = self.on_device(("perm", task_id), self.permutation(task_id), y.device)
        return x, perm[y]


class RandomLabelTasks(TaskKind):
    """Each task assigns every example a fresh uniformly random label (Lyle et al. 2023).

    The network must memorise: example ``i`` of split ``s`` gets label ``L_t[s][i]`` drawn
    uniformly from the classes with a generator seeded by ``(seed, t, s)``. Usually combined
    with ``subset_size`` so memorisation is feasible.
    """

    name = "random_labels"

    def table(self, task_id: int, split: Split) -> Tensor:
        assert self.data.num_classes is not None
        n, c = self.split_size(split), self.data.num_classes
        return self.cached(("labels", task_id, split), lambda: torch.randint(
            0, c, (n,), generator=generator(self.seed, self.name, task_id, split)))

    def apply(self, x: Tensor, y: Tensor, idx: Tensor, task_id: int, split: Split) -> tuple[
        Tensor, Tensor
    ]:
        table = self.on_device(("labels", task_id, split), self.table(task_id, split), y.device)
        return x, table[idx.to(y.device)]
