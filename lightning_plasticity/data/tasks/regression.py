"""Regression task kinds: ``random_targets`` and ``slowly_changing_regression``."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_plasticity.data.base_datasets import BaseData
from lightning_plasticity.data.seeding import generator
from lightning_plasticity.data.tasks.base import Split, TaskKind, TaskOptions
from lightning_plasticity.data.teachers import LTUTeacher, TanhTeacher


class RandomTargetTasks(TaskKind):
    """Each task regresses onto a fresh random function of the inputs (Lyle et al. 2024).

    Targets of task ``t`` are ``target_mean + target_scale * f_t(x)`` with ``f_t`` a random
    :class:`TanhTeacher` drawn from ``(seed, t)`` and standardised to zero mean, unit variance on
    the first 1024 training inputs. A large ``target_mean`` reproduces Lyle et al.'s
    "Disentangling the causes of plasticity loss" mechanism of large target offsets. Works on
    any base dataset; its labels are ignored.
    """

    name = "random_targets"
    regression = True
    requires_classes = False

    @property
    def num_outputs(self) -> int:
        return self.options.target_dim

    def teacher(self, task_id: int) -> TanhTeacher:
        def build() -> TanhTeacher:
            reference = self.data.normalize(self.data.train_x[:1024]).flatten(1)
            return TanhTeacher(reference.shape[1], self.options.target_dim, reference,
                               generator=generator(self.seed, self.name, task_id))
        return self.cached(("teacher", task_id), build)

    def apply(self, x: Tensor, y: Tensor, idx: Tensor, task_id: int, split: Split) -> tuple[
        Tensor, Tensor
    ]:
        target = self.teacher(task_id)(x)
        return x, self.options.target_mean + self.options.target_scale * target


class SlowlyChangingRegressionTasks(TaskKind):
    """Dohare et al.'s slowly-changing regression.

    Dohare et al., "Loss of plasticity in deep continual learning" (Nature 2024). Inputs are
    ``m`` bits; the first ``num_slow_bits`` (``f``, 15 in the paper) are the same for every
    example of a task and the rest are random per example (the ``regression_teacher`` base set
    supplies them). From one task to the next exactly one slow bit flips (the paper flips one
    every ``T`` examples: ``steps_per_task`` plays ``T``). The target is the base set's fixed
    :class:`LTUTeacher` applied to the modified input, so the function stays fixed while the
    input distribution drifts. Slow bits of task 0 and every flip are drawn from
    ``(seed, t)``, so task ``t`` is a pure function of them.
    """

    name = "slowly_changing_regression"
    regression = True
    requires_classes = False

    def __init__(self, data: BaseData, seed: int, num_tasks: int, options: TaskOptions) -> None:
        super().__init__(data, seed, num_tasks, options)
        if not isinstance(data.teacher, LTUTeacher):
            raise ValueError(
                "slowly_changing_regression needs dataset='regression_teacher' (random input "
                f"bits and an LTU teacher), got dataset={data.name!r}."
            )
        m = data.input_shape[0]
        if not 0 < options.num_slow_bits < m:
            raise ValueError(
                f"num_slow_bits must be in [1, {m - 1}] for {m} input bits, got "
                f"{options.num_slow_bits}. Change num_slow_bits or synthetic_input_dim."
            )
        self._last: tuple[int, Tensor] = (0, torch.randint(
            0, 2, (options.num_slow_bits,), generator=generator(seed, self.name, "start")).float())

    def slow_bits(self, task_id: int) -> Tensor:
        """The slow bits of task ``task_id``: the start bits with ``task_id`` flips applied."""
        start, bits = self._last
        if task_id < start:
            start, bits = 0, torch.randint(0, 2, (self.options.num_slow_bits,), generator=generator(
                self.seed, self.name, "start")).float()
        bits = bits.clone()
        for t in range(start + 1, task_id + 1):
            k = int(torch.randint(0, self.options.num_slow_bits, (1,),
                                  generator=generator(self.seed, self.name, "flip", t)))
            bits[k] = 1.0 - bits[k]
        self._last = (task_id, bits)
        return bits

    def apply(self, x: Tensor, y: Tensor, idx: Tensor, task_id: int, split: Split) -> tuple[
        Tensor, Tensor
    ]:
        f = self.options.num_slow_bits
        slow = self.cached(("slow", task_id), lambda: self.slow_bits(task_id)).to(x.device)
        x = torch.cat([slow.expand(x.shape[0], f).to(x.dtype), x[:, f:]], dim=1)
        assert self.data.teacher is not None
        return x, self.data.teacher(x)
