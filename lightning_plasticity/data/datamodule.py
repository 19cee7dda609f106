"""``ContinualDataModule``: one LightningDataModule that serves a sequence of tasks."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_plasticity.data.base_datasets import (
    _TORCHVISION,
    DATASETS,
    BaseData,
    DatasetOptions,
    load_base_data,
)
from lightning_plasticity.data.samplers import (
    BaseSplitDataset,
    EvalStreamSampler,
    TrainStreamSampler,
)
from lightning_plasticity.data.seeding import generator
from lightning_plasticity.data.task_events import TaskEventDispatcher
from lightning_plasticity.data.task_progress import TaskProgress, end_task_metrics, trainable_flag
from lightning_plasticity.data.tasks import TASK_KINDS, Split, TaskKind, TaskOptions, make_task_kind

DEFAULT_STEPS_PER_TASK = 500


class _ResumableLoader(DataLoader):
    """Marks the stream's loaders as resumable for Lightning.

    The position in the stream is part of :meth:`ContinualDataModule.state_dict` (saved in every
    checkpoint), and the sampler starts from it, so there is nothing to store here; the methods
    only tell Lightning that a mid-epoch resume is exact.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class ContinualDataModule(pl.LightningDataModule):
    """A base dataset turned into a deterministic sequence of tasks.

    **Schedule.** With ``steps_per_task=K`` one Lightning epoch is one task of exactly ``K``
    optimizer steps (``K * accumulate_grad_batches`` batches), so task ``t`` starts at global step
    ``K * t``. With ``epochs_per_task=E`` a task lasts ``E`` passes over its examples. The data
    module sets the trainer's ``max_epochs`` to ``num_tasks * E`` (``E = 1`` with
    ``steps_per_task``); use ``max_steps`` to stop earlier.

    **Determinism.** Task ``t``'s permutation, labels, examples and batch order are pure
    functions of ``(seed, t)``, so repeated and resumed runs see identical tasks.

    **Worker safety.** Samplers decide in the main process which task and examples every batch
    holds; workers only index tensors. The task's change (e.g. a label permutation) is applied in
    :meth:`on_after_batch_transfer`, on the device. Under DDP each global batch is split across
    ranks, so every rank is in the same task at the same step. ``batch_size`` is per rank.

    **Task events.** During ``fit`` a :class:`TaskEventDispatcher` is added to the trainer's
    callbacks. At every switch it calls ``on_task_end(trainer, pl_module, task_id)`` for the old
    task and then ``on_task_start(trainer, pl_module, task_id)`` for the new one, on every rank:
    first on the LightningModule, then on every callback in ``trainer.callbacks`` order. Task 0's
    ``on_task_start`` runs at the first training epoch. The end of task ``t`` comes after its
    validation and after the module's ``on_train_epoch_end``.

    **Metrics.** ``task/id`` and ``task/train_loss`` are logged at the trainer's logging steps
    (``log_every_n_steps``), plus
    ``task/train_accuracy`` when ``training_step`` returns a dict with ``"logits"``;
    ``task/end_loss`` and ``task/end_accuracy`` at each task's end, averaged over its last
    ``end_window`` batches (the seeds' task-end batch error) and over ranks, together with
    ``task/online_accuracy`` (mean training-batch accuracy over the whole task),
    ``task/steps_to_target`` (optimizer steps into the task until the mean accuracy of the last
    ``end_window`` batches first reached ``target_accuracy``; NaN if never) and
    ``task/trainable``, the tau-trainability flag of Lewandowski et al.'s poster: 1 when the
    task-end accuracy is within ``trainability_tolerance`` of the best task-end accuracy so far
    (for regression: task-end loss within the tolerance of the best). The per-task history
    is :attr:`task_history`. Validation uses held-out examples of the current task and, with
    ``val_previous_tasks=n``, of the ``n`` tasks before it (dataloader ``j`` is ``j`` tasks back).

    Args:
        dataset: base dataset: ``digits`` (scikit-learn's bundled 8x8 digits, no download),
            ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100`` (torchvision, from
            ``data_dir``), ``image_folder`` (class subfolders under ``data_dir``),
            ``gaussian_mixture`` or ``regression_teacher`` (synthetic, no files).
        task: task kind: ``permuted_labels``, ``random_labels``, ``permuted_inputs``,
            ``class_pairs``, ``class_incremental``, ``random_targets``,
            ``slowly_changing_regression`` or ``identity``.
        num_tasks: number of tasks.
        steps_per_task: optimizer steps per task (default 500 when neither this nor
            ``epochs_per_task`` is given).
        epochs_per_task: passes over the task's examples per task, instead of ``steps_per_task``.
        batch_size: examples per batch and rank.
        subset_size: use this many examples per task (drawn from ``(seed, t)``), or all.
        val_size: at most this many held-out examples are evaluated per task.
        val_previous_tasks: also validate on this many earlier tasks.
        end_window: batches before a switch over which task-end metrics are averaged.
        target_accuracy: accuracy that ``task/steps_to_target`` waits for.
        trainability_tolerance: ``v`` of the tau-trainability flag ``task/trainable``.
        seed: the seed every task derives from.
        num_workers: DataLoader worker processes.
        persistent_workers: keep workers alive between epochs (tasks).
        pin_memory: pin batches for faster host-to-GPU copies.
        data_dir: root of torchvision datasets, or the image folder.
        download: let torchvision download missing datasets.
        val_fraction: fraction held out when the dataset has no official test split.
        image_size: side length images of ``image_folder`` are resized to.
        synthetic_num_classes: classes of ``gaussian_mixture``.
        synthetic_input_dim: input size of ``gaussian_mixture`` and input bits of
            ``regression_teacher`` (20 in Dohare et al.'s slowly-changing regression).
        synthetic_num_examples: examples of the synthetic datasets.
        classes_per_task: classes added per task by ``class_incremental``.
        target_mean: mean of ``random_targets``' targets.
        target_scale: scale of ``random_targets``' targets.
        target_dim: outputs of ``random_targets``.
        num_slow_bits: slowly-changing bits of ``slowly_changing_regression`` (15 in the paper).

    Example::

        >>> import tempfile
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import ContinualClassifier
        >>> dm = ContinualDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=2,
        ...                          batch_size=16, val_size=32)
        >>> model = ContinualClassifier()
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp())
        >>> trainer.fit(model, datamodule=dm)
        >>> len(dm.task_history), dm.task_history[-1]["task"]  # one entry per finished task
        (2, 1.0)
        >>> 0.0 <= dm.task_history[-1]["end_accuracy"] <= 1.0
        True
    """

    def __init__(
        self,
        dataset: str = "digits",
        task: str = "permuted_labels",
        num_tasks: int = 10,
        steps_per_task: int | None = None,
        epochs_per_task: int | None = None,
        batch_size: int = 64,
        subset_size: int | None = None,
        val_size: int | None = 1000,
        val_previous_tasks: int = 0,
        end_window: int = 10,
        target_accuracy: float = 0.9,
        trainability_tolerance: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        data_dir: str = "data",
        download: bool = False,
        val_fraction: float = 0.2,
        image_size: int = 32,
        synthetic_num_classes: int = 10,
        synthetic_input_dim: int = 20,
        synthetic_num_examples: int = 5000,
        classes_per_task: int = 2,
        target_mean: float = 0.0,
        target_scale: float = 1.0,
        target_dim: int = 1,
        num_slow_bits: int = 15,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"Unknown dataset {dataset!r}. Choose one of: {', '.join(DATASETS)}.")
        if task not in TASK_KINDS:
            raise ValueError(f"Unknown task kind {task!r}. Choose one of: {', '.join(TASK_KINDS)}.")
        if steps_per_task is not None and epochs_per_task is not None:
            raise ValueError("Give either steps_per_task or epochs_per_task, not both.")
        if steps_per_task is None and epochs_per_task is None:
            steps_per_task = DEFAULT_STEPS_PER_TASK
        for name, value, low in [("steps_per_task", steps_per_task, 1),
                                 ("epochs_per_task", epochs_per_task, 1),
                                 ("num_tasks", num_tasks, 1), ("batch_size", batch_size, 1),
                                 ("subset_size", subset_size, 1), ("val_size", val_size, 1),
                                 ("end_window", end_window, 1), ("num_workers", num_workers, 0),
                                 ("val_previous_tasks", val_previous_tasks, 0)]:
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}.")
        if not 0.0 < target_accuracy <= 1.0 or trainability_tolerance < 0:
            raise ValueError(
                f"Need 0 < target_accuracy <= 1 and trainability_tolerance >= 0; got "
                f"{target_accuracy} and {trainability_tolerance}.")
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0.")
        self.save_hyperparameters()
        self.dataset_name, self.task_name = dataset, task
        self.num_tasks, self.steps_per_task = num_tasks, steps_per_task
        self.epochs_per_task = epochs_per_task or 1
        self.batch_size, self.subset_size, self.val_size = batch_size, subset_size, val_size
        self.val_previous_tasks, self.end_window, self.seed = val_previous_tasks, end_window, seed
        self.target_accuracy, self.trainability_tolerance = target_accuracy, trainability_tolerance
        self.num_workers, self.persistent_workers = num_workers, persistent_workers
        self.pin_memory = pin_memory
        self.dataset_options = DatasetOptions(
            data_dir=data_dir, download=download, val_fraction=val_fraction,
            image_size=image_size, num_classes=synthetic_num_classes,
            input_dim=synthetic_input_dim, num_examples=synthetic_num_examples, seed=seed)
        self.task_options = TaskOptions(
            classes_per_task=classes_per_task, target_mean=target_mean,
            target_scale=target_scale, target_dim=target_dim, num_slow_bits=num_slow_bits)
        self._base: BaseData | None = None
        self._kind: TaskKind | None = None
        self._examples: dict[tuple[int, str], Tensor] = {}
        self.world_size, self.rank, self.accumulate_grad_batches = 1, 0, 1
        #: the stream position and the current task's batches (in state_dict: resume is exact)
        self.progress = TaskProgress()

    # ------------------------------------------------------------------ data and tasks
    @property
    def base(self) -> BaseData:
        """The base dataset, loaded on first use."""
        if self._base is None:
            self._base = load_base_data(self.dataset_name, self.dataset_options)
        return self._base

    @property
    def kind(self) -> TaskKind:
        """The task kind, built (and checked against the data) on first use."""
        if self._kind is None:
            self._kind = make_task_kind(self.task_name, self.base, self.seed, self.num_tasks,
                                        self.task_options)
        return self._kind

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example, without the batch dimension."""
        return self.base.input_shape

    @property
    def num_outputs(self) -> int:
        """Output size a network needs: classes per task, or regression targets."""
        return self.kind.num_outputs

    @property
    def is_regression(self) -> bool:
        return self.kind.is_regression

    def task_examples(self, task_id: int, split: Split = "train") -> Tensor:
        """Indices into the base split of the examples task ``task_id`` uses."""
        key = (task_id, split)
        if key not in self._examples:
            idx = self.kind.example_indices(task_id, split)
            cap = self.subset_size if split == "train" else self.val_size
            if cap is not None and cap < idx.shape[0]:
                pick = torch.randperm(idx.shape[0], generator=generator(
                    self.seed, "subset", split, task_id))[:cap]
                idx = idx[pick.sort().values]
            if idx.shape[0] == 0:
                raise ValueError(f"Task {task_id} of {self.task_name!r} has no {split} examples.")
            if len(self._examples) >= 32:
                self._examples.pop(next(iter(self._examples)))
            self._examples[key] = idx
        return self._examples[key]

    def _task_sizes(self, split: Split) -> list[int]:
        tasks = range(self.num_tasks) if self.kind.indices_depend_on_task else range(1)
        return [int(self.task_examples(t, split).shape[0]) for t in tasks]

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def train_batches_per_epoch(self) -> int:
        if self.steps_per_task is not None:
            return self.steps_per_task * self.accumulate_grad_batches
        return max(math.ceil(n / self.global_batch_size) for n in self._task_sizes("train"))

    @property
    def val_batches_upper_bound(self) -> int:
        return max(math.ceil(n / self.global_batch_size) for n in self._task_sizes("val"))

    def task_of_epoch(self, epoch: int) -> int:
        return epoch // self.epochs_per_task

    def batches_in_epoch(self, epoch: int) -> int:
        """Training batches epoch ``epoch`` really has (its task may have fewer than the max)."""
        if self.steps_per_task is not None:
            return self.train_batches_per_epoch
        n = self.task_examples(self.task_of_epoch(epoch), "train").shape[0]
        return math.ceil(n / self.global_batch_size)

    def task_completed_in_epoch(self, epoch: int) -> bool:
        """Whether ``epoch`` ended its task with all its batches (not cut short by max_steps)."""
        return self.progress.completed(epoch, self.batches_in_epoch(epoch), self.epochs_per_task)

    @property
    def task_id(self) -> int:
        """The current task."""
        return self.progress.task_id

    @property
    def task_history(self) -> list[dict[str, float]]:
        """One record per finished task: ``task``, ``global_step`` and the task metrics."""
        return self.progress.history

    def train_epoch_batches(self, epoch: int, start: int) -> Iterator[tuple[int, Tensor]]:
        """Global batches of one epoch from batch ``start`` on, as ``(task_id, indices)``."""
        task_id = self.task_of_epoch(epoch)
        idx, gb = self.task_examples(task_id, "train"), self.global_batch_size
        n = idx.shape[0]
        if self.steps_per_task is None:
            # One pass in a fresh order per epoch; the last batch is completed by wrapping around
            # (as DistributedSampler pads) so every rank gets an equal, full batch.
            order = idx[torch.randperm(n, generator=generator(
                self.seed, "order", task_id, epoch % self.epochs_per_task))]
            num_batches = math.ceil(n / gb)
            order = order.repeat(math.ceil(num_batches * gb / n))[: num_batches * gb]
            for b in range(start, num_batches):
                yield task_id, order[b * gb:(b + 1) * gb]
            return
        # Fixed number of steps: an endless stream of passes, each in a fresh order.
        pass_id, offset = divmod(start * gb, n)
        order = idx[torch.randperm(n, generator=generator(self.seed, "order", task_id, pass_id))]
        for _ in range(start, self.train_batches_per_epoch):
            pieces, needed = [], gb
            while needed > 0:
                if offset == n:
                    pass_id, offset = pass_id + 1, 0
                    order = idx[torch.randperm(n, generator=generator(
                        self.seed, "order", task_id, pass_id))]
                take = min(needed, n - offset)
                pieces.append(order[offset:offset + take])
                offset, needed = offset + take, needed - take
            yield task_id, pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def eval_batches(self, task_id: int) -> Iterator[Tensor]:
        idx, gb = self.task_examples(task_id, "val"), self.global_batch_size
        num_batches = math.ceil(idx.shape[0] / gb)
        padded = idx.repeat(math.ceil(num_batches * gb / idx.shape[0]))[: num_batches * gb]
        for b in range(num_batches):
            yield padded[b * gb:(b + 1) * gb]

    def apply_task(self, x: Tensor, y: Tensor, idx: Tensor, task_id: int,
                   split: Split = "train") -> tuple[Tensor, Tensor]:
        """Normalise raw stored inputs and apply task ``task_id``'s change (on their device)."""
        return self.kind.apply(self.base.normalize(x), y, idx, task_id, split)

    def probe_batch(self, size: int, task_id: int | None = None, split: Split = "train",
                    device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """A fixed batch of ``size`` examples of a task (default: the current one).

        The examples are a pure function of ``(seed, task_id, split)``: measurement callbacks
        use this to evaluate the same inputs every time.
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"probe_batch: size must be an int >= 1, got {size!r}.")
        task_id = self.task_id if task_id is None else task_id
        if not 0 <= task_id < self.num_tasks:
            raise ValueError(f"probe_batch: task_id must be in [0, {self.num_tasks}), got "
                             f"{task_id}.")
        idx = self.task_examples(task_id, split)
        pick = torch.randperm(idx.shape[0], generator=generator(self.seed, "probe", split,
                                                                task_id))[:size]
        idx = idx[pick]
        x_all = self.base.train_x if split == "train" else self.base.val_x
        y_all = self.base.train_y if split == "train" else self.base.val_y
        x, y = x_all[idx], y_all[idx]
        if device is not None:
            x, y, idx = x.to(device), y.to(device), idx.to(device)
        return self.apply_task(x, y, idx, task_id, split)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def prepare_data(self) -> None:
        # Runs on one process per node: the only place a download may happen.
        if self.dataset_options.download and self.dataset_name in _TORCHVISION:
            load_base_data(self.dataset_name, self.dataset_options)

    @override
    def setup(self, stage: str) -> None:
        self.kind  # noqa: B018 - loads the data and validates the task kind early
        trainer = self.trainer
        if trainer is None:
            return
        self.world_size, self.rank = trainer.world_size, trainer.global_rank
        self.accumulate_grad_batches = trainer.accumulate_grad_batches
        if stage == "fit":
            if not any(isinstance(c, TaskEventDispatcher) for c in trainer.callbacks):
                # First, so task state is updated before other callbacks (and checkpoints) run.
                trainer.callbacks.insert(0, TaskEventDispatcher())
            needed = self.num_tasks * self.epochs_per_task
            asked = trainer.fit_loop.max_epochs
            # Lightning's own defaults: None/-1 (no limit) or 1000 (max_steps unset).
            if asked not in (None, -1, 1000, needed):
                raise ValueError(
                    f"Trainer(max_epochs={asked}) conflicts with the task stream: num_tasks="
                    f"{self.num_tasks} x epochs_per_task={self.epochs_per_task} needs "
                    f"{needed} epochs (one task per epoch). Leave max_epochs unset (the data "
                    "module sets it), change num_tasks, or stop early with max_steps.")
            trainer.fit_loop.max_epochs = needed

    def _loader(self, sampler: TrainStreamSampler | EvalStreamSampler) -> DataLoader:
        return _ResumableLoader(sampler.dataset, batch_size=None, sampler=sampler,
                          num_workers=self.num_workers,
                          persistent_workers=self.persistent_workers,
                          pin_memory=self.pin_memory)

    @override
    def train_dataloader(self) -> DataLoader:
        dataset = BaseSplitDataset(self.base.train_x, self.base.train_y)
        sampler = TrainStreamSampler(self, dataset, self.world_size, self.rank)
        if self.trainer is not None:
            # The first iterator is created before Lightning calls set_epoch: start in the
            # epoch the fit loop is about to run (not 0) so a resumed run continues its task.
            sampler.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed)
        return self._loader(sampler)

    @override
    def val_dataloader(self) -> list[DataLoader]:
        dataset = BaseSplitDataset(self.base.val_x, self.base.val_y)
        return [self._loader(EvalStreamSampler(self, dataset, self.world_size, self.rank, lag))
                for lag in range(self.val_previous_tasks + 1)]

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, (tuple, list)) and len(batch) == 5 and isinstance(batch[4], str):
            x, y, idx, task_id, split = batch
            return self.apply_task(x, y, idx, int(task_id), split)
        return batch

    # ------------------------------------------------------------------ task metrics
    def end_task_record(self, global_step: int) -> dict[str, float]:
        """The finished task's record: its metrics (over ranks: every rank must call this at the
        same point) and the trainability flag against the earlier tasks."""
        losses, accuracies = self.progress.batches.compute()
        record: dict[str, float] = {"task": float(self.task_id), "global_step": float(global_step),
                                    **end_task_metrics(
                                        losses, accuracies, end_window=self.end_window,
                                        target_accuracy=self.target_accuracy,
                                        accumulate_grad_batches=self.accumulate_grad_batches)}
        record["trainable"] = trainable_flag(record, self.task_history,
                                             self.trainability_tolerance,
                                             chance=self.chance_accuracy())
        return record

    def chance_accuracy(self, task_id: int | None = None) -> float | None:
        """The accuracy of always predicting the task's most frequent label (its chance level),
        estimated on a probe batch of up to 1024 training examples; None for regression."""
        if self.is_regression:
            return None
        _, y = self.probe_batch(1024, task_id=task_id)
        if y.is_floating_point() or y.numel() == 0:
            return None
        return float(torch.bincount(y.reshape(-1).long()).max()) / y.numel()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset_name, "task": self.task_name, "seed": self.seed,
            "steps_per_task": self.steps_per_task, "epochs_per_task": self.epochs_per_task,
            "batch_size": self.batch_size, "num_tasks": self.num_tasks,
            **self.progress.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # num_tasks may grow (continue a run with more tasks); the rest fixes where steps fall.
        for key, mine in [("dataset", self.dataset_name), ("task", self.task_name),
                          ("seed", self.seed), ("steps_per_task", self.steps_per_task),
                          ("epochs_per_task", self.epochs_per_task),
                          ("batch_size", self.batch_size)]:
            if state_dict.get(key, mine) != mine:
                raise ValueError(
                    f"The checkpoint's task stream has {key}={state_dict[key]!r} but this data "
                    f"module has {key}={mine!r}; resume with the same {key} or start a new run."
                )
        self.progress.load_state_dict(state_dict)
