"""Samplers that decide, in the main process, which task and examples each batch holds.

Each sampler item is a whole batch: ``(task_id, example_indices, split)``. The dataset turns it
into raw tensors inside the workers; the task's change is applied after the transfer to the
device. Nothing random is drawn in a worker, so ``num_workers``, ``persistent_workers`` and
prefetching cannot change what a batch contains.

They subclass :class:`~torch.utils.data.DistributedSampler` only so Lightning recognises them as
already distributed and does not wrap them: each one shards every global batch across ranks
itself, so all ranks are in the same task at the same step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

if TYPE_CHECKING:
    from lightning_plasticity.data.datamodule import ContinualDataModule

BatchKey = tuple[int, Tensor, str]


class BaseSplitDataset(Dataset):
    """Indexes a base split by a whole batch key; returns ``(x, y, idx, task_id, split)``."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, key: BatchKey) -> tuple[Tensor, Tensor, Tensor, int, str]:
        task_id, idx, split = key
        return self.x[idx], self.y[idx], idx, task_id, split


class _StreamSampler(DistributedSampler):
    def __init__(self, dm: ContinualDataModule, dataset: Dataset, num_replicas: int,
                 rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.dm = dm

    def _shard(self, global_idx: Tensor) -> Tensor:
        b = global_idx.shape[0] // self.num_replicas
        return global_idx[self.rank * b:(self.rank + 1) * b]


class TrainStreamSampler(_StreamSampler):
    """One training epoch of the task stream; Lightning calls ``set_epoch`` each epoch."""

    def __len__(self) -> int:
        return self.dm.train_batches_per_epoch

    def __iter__(self) -> Iterator[BatchKey]:
        start = self.dm.progress.take_resume_offset(self.epoch)
        for task_id, global_idx in self.dm.train_epoch_batches(self.epoch, start):
            yield task_id, self._shard(global_idx), "train"


class EvalStreamSampler(_StreamSampler):
    """Held-out batches of the current task, or of the task ``lag`` tasks before it.

    The task is read when iteration starts, so one DataLoader serves every task.
    """

    def __init__(self, dm: ContinualDataModule, dataset: Dataset, num_replicas: int, rank: int,
                 lag: int) -> None:
        super().__init__(dm, dataset, num_replicas, rank)
        self.lag = lag

    def __len__(self) -> int:
        return self.dm.val_batches_upper_bound

    def __iter__(self) -> Iterator[BatchKey]:
        task_id = self.dm.task_id - self.lag
        if task_id < 0:
            return
        for global_idx in self.dm.eval_batches(task_id):
            yield task_id, self._shard(global_idx), "val"
