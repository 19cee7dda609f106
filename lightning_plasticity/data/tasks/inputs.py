"""``permuted_inputs``: a fixed pixel permutation per task (permuted MNIST)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_plasticity.data.seeding import generator
from lightning_plasticity.data.tasks.base import Split, TaskKind


class PermutedInputTasks(TaskKind):
    """Each task shuffles the input positions by a fixed permutation (Goodfellow et al. 2013).

    For images ``(C, H, W)`` the ``H * W`` spatial positions are permuted, the same way in every
    channel; for flat vectors the features are permuted. Task ``t``'s permutation is drawn from
    ``(seed, t)``; task 0 is permuted too, so no task is privileged. Labels are unchanged.
    """

    name = "permuted_inputs"
    requires_classes = False

    def _positions(self) -> int:
        shape = self.data.input_shape
        return shape[0] if len(shape) == 1 else int(torch.tensor(shape[1:]).prod())

    def permutation(self, task_id: int) -> Tensor:
        n = self._positions()
        return self.cached(("perm", task_id), lambda: torch.randperm(
            n, generator=generator(self.seed, self.name, task_id)))

    def apply(self, x: Tensor, y: Tensor, idx: Tensor, task_id: int, split: Split) -> tuple[
        Tensor, Tensor
    ]:
        perm = self.on_device(("perm", task_id), self.permutation(task_id), x.device)
        # index_select is several times faster than advanced indexing for this gather.
        if x.dim() == 2:
            return torch.index_select(x, 1, perm), y
        return torch.index_select(x.flatten(2), 2, perm).reshape(x.shape), y
