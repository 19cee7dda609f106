"""``HessianRankCallback``: the Hessian's eps-rank, top eigenvalues and gradient overlap."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_plasticity.callbacks.measurement import MeasurementCallback, MeasurementSkipped
from lightning_plasticity.callbacks.probe import ModuleLossFn
from lightning_plasticity.core.batch import batch_size
from lightning_plasticity.measures.grad_hessian_overlap import gradient_hessian_overlap
from lightning_plasticity.measures.hessian_spectrum import (
    DEFAULT_EPS_RANK_MATVECS,
    MIN_EPS_RANK_MATVECS,
    hessian_eps_rank,
)
from lightning_plasticity.measures.hvp import DEFAULT_MAX_DENSE_PARAMS
from lightning_plasticity.measures.parameter_selection import select_parameters


class HessianRankCallback(MeasurementCallback):
    """Tracks the curvature of the training loss on a fixed probe batch of the current task.

    Lewandowski et al. ("Directions of curvature as an explanation for loss of plasticity")
    tie loss of plasticity to the loss of directions of curvature: the number of Hessian
    eigenvalues with ``|lambda| > threshold`` (the eps-rank) falls. By default this callback
    measures it at the start of every task, the point the paper measures, over the *whole*
    model with :func:`~lightning_plasticity.measures.hessian_spectrum.hessian_eps_rank`, and
    the gradient-Hessian overlap ``g^T H g / (||g|| ||H g||)``.

    What it costs: ``method="auto"`` takes the exact dense Hessian where the cost model
    predicts it to be cheaper than the estimate (small models), else the deflated-SLQ
    estimate with its error bar. ``max_overhead`` caps the estimate's Hessian-vector products
    at that fraction of the training time between two measurements (timed; before the first
    interval is known, predicted from a timed forward and backward pass and the data module's
    ``steps_per_task``), never below 300 products (fewer give a biased count). Where even 300
    cost more than ``max_overhead`` of the training between two scheduled points (tasks of a
    fraction of a second, as in the quickstart), it measures at every ``k``-th point instead,
    with ``k`` the smallest stride that keeps the average within the cap, and says so once;
    ``max_overhead=None`` measures at every point whatever it costs, and makes the schedule
    and the product count independent of the machine's speed. Fewer products give a wider
    ``hessian_eps_rank_error``.
    ``curvature/measure_seconds/hessian_rank`` logs what each measurement took.

    The loss is the module's own: ``loss_fn(pl_module, batch)`` if given, else its
    ``plasticity_loss(batch)``, else its ``training_step`` (logging suppressed). The model is
    measured in eval mode (BatchNorm uses running statistics, dropout is off) and nothing about
    training changes: parameters, gradients, optimizer state, RNG streams and modes are restored.
    Under DDP every rank measures its shard of the probe batch and Hessian-vector products are
    all-reduced, so all ranks get the single-process result on the whole probe batch.

    Logged under ``curvature/``: ``hessian_eps_rank``, ``hessian_eps_rank_normalized`` (over
    the parameters measured), ``hessian_eps_rank_error`` (0 when exact, else a ~95% error
    bar), ``hessian_effective_rank``, ``hessian_top_eigenvalue``, ``hessian_num_params``,
    ``grad_hessian_overlap``, ``grad_norm``, ``grad_rayleigh_quotient``
    (``g^T H g / ||g||^2``); the top eigenvalues go to the history and to wandb as a histogram.

    Args:
        eps: eigenvalue threshold, relative to ``|lambda_max|`` when ``relative`` (default
            ``1e-3``: directions flatter than that take more than ~1000 steps to learn).
        relative: whether ``eps`` is relative to the largest-magnitude eigenvalue.
        method: ``"auto"`` (the cost model), ``"dense"`` (exact) or ``"lanczos"`` (estimate).
        modules: measure the block of these submodules (names or fnmatch patterns) instead of
            the whole model.
        last_n_layers: measure the block of the last ``n`` parameterised layers (the
            "partial blockwise Hessian" of Lewandowski et al.) instead of the whole model.
        max_dense_params: parameter limit of the dense method.
        num_matvecs: Hessian-vector products of the estimate when time allows.
        max_overhead: fraction of the training time between measurements the estimate may
            take (``None``: always ``num_matvecs`` products).
        top_k: how many of the largest eigenvalues to record.
        overlap: also measure the gradient-Hessian overlap (one more Hessian-vector product).
        probe_size, loss_fn, on_task_start, on_task_end, every_n_train_steps, every_n_tasks:
            see :class:`MeasurementCallback`.

    Example::

        >>> import tempfile
        >>> from functools import partial
        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.callbacks import HessianRankCallback
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import MLP, ContinualClassifier
        >>> _ = torch.manual_seed(0)
        >>> dm = ContinualDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=2,
        ...                          batch_size=16, val_size=32)
        >>> model = ContinualClassifier(network=partial(MLP, width=16))
        >>> cb = HessianRankCallback(last_n_layers=1, probe_size=32)  # the head's 16 * 10 + 10
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp(),
        ...                   callbacks=[cb])
        >>> trainer.fit(model, datamodule=dm)
        >>> [(h["task"], h["event"]) for h in cb.history]  # at the start of every task
        [(0, 'task_start'), (1, 'task_start')]
        >>> metrics = trainer.callback_metrics
        >>> int(metrics["curvature/hessian_num_params"])
        170
        >>> rank = int(metrics["curvature/hessian_eps_rank"])  # of the exact 170 x 170 Hessian
        >>> 0 < rank <= 170, float(metrics["curvature/hessian_eps_rank_error"])
        (True, 0.0)
        >>> cb.history[0]["curvature/measure_seconds/hessian_rank"] > 0  # what it cost
        True
    """

    def __init__(
        self,
        eps: float = 1e-3,
        relative: bool = True,
        method: Literal["auto", "dense", "lanczos"] = "auto",
        modules: Sequence[str] | None = None,
        last_n_layers: int | None = None,
        max_dense_params: int = DEFAULT_MAX_DENSE_PARAMS,
        num_matvecs: int = DEFAULT_EPS_RANK_MATVECS,
        max_overhead: float | None = 0.5,
        top_k: int = 20,
        overlap: bool = True,
        probe_size: int = 256,
        loss_fn: ModuleLossFn | None = None,
        on_task_start: bool = True,
        on_task_end: bool = False,
        every_n_train_steps: int | None = None,
        every_n_tasks: int = 1,
    ) -> None:
        super().__init__(probe_size=probe_size, loss_fn=loss_fn, on_task_start=on_task_start,
                         on_task_end=on_task_end, every_n_train_steps=every_n_train_steps,
                         every_n_tasks=every_n_tasks)
        if eps <= 0:
            raise ValueError(f"HessianRankCallback: eps must be > 0, got {eps}.")
        if method not in ("auto", "dense", "lanczos"):
            raise ValueError(
                f"HessianRankCallback: method must be auto, dense or lanczos, got {method!r}.")
        if modules is not None and last_n_layers is not None:
            raise ValueError("HessianRankCallback: give modules or last_n_layers, not both.")
        if last_n_layers is not None and last_n_layers < 1:
            raise ValueError(
                f"HessianRankCallback: last_n_layers must be >= 1, got {last_n_layers}.")
        if top_k < 1 or max_dense_params < 1:
            raise ValueError("HessianRankCallback: top_k and max_dense_params must be >= 1.")
        if num_matvecs < MIN_EPS_RANK_MATVECS:
            raise ValueError(f"HessianRankCallback: num_matvecs must be >= "
                             f"{MIN_EPS_RANK_MATVECS}, got {num_matvecs}.")
        if max_overhead is not None and not max_overhead > 0:
            raise ValueError("HessianRankCallback: max_overhead must be > 0 (a fraction of the "
                             f"training time, e.g. 0.5) or None, got {max_overhead}.")
        self.eps, self.relative, self.method = eps, relative, method
        self.modules = list(modules) if modules is not None else None
        self.last_n_layers, self.max_dense_params = last_n_layers, max_dense_params
        self.num_matvecs, self.max_overhead = num_matvecs, max_overhead
        self.top_k, self.overlap = top_k, overlap
        self._stride, self._pending = 1, 0  # measure at every _stride-th scheduled point

    @override
    def measure_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: str,
                    task_id: int) -> dict[str, Any] | None:
        """Measure, or pass this scheduled point when measuring every one would exceed
        ``max_overhead`` (see the class docstring)."""
        if self._pending + 1 < self._stride:
            self._pending += 1
            return None
        events, self._pending = self._pending + 1, 0
        record = super().measure_now(trainer, pl_module, event, task_id)
        if record is None or self.max_overhead is None or not self.interval_seconds:
            return record
        # The training one scheduled point buys, against what a measurement costs (the max
        # over ranks already); every rank must take the same stride.
        per_event = self.interval_seconds / events
        stride = max(1, math.ceil(record[self.cost_key] / (self.max_overhead * per_event)))
        if trainer.world_size > 1:
            stride = int(trainer.strategy.reduce(torch.tensor(float(stride)), reduce_op="max"))
        if stride > 1 and stride != self._stride:
            self._note_once(
                f"one measurement takes {record[self.cost_key]:.2f} s and the training between "
                f"two scheduled points {per_event:.2f} s: to stay within max_overhead="
                f"{self.max_overhead} it measures at one in every {stride} of them (at least 300 "
                "Hessian-vector products keep the estimate unbiased). Set max_overhead=None to "
                "measure at every point")
        self._stride = stride
        return record

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stride": self._stride, "pending": self._pending}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._stride = int(state_dict.get("stride", 1))
        self._pending = int(state_dict.get("pending", 0))

    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "eps": self.eps, "method": self.method,
                "modules": self.modules, "last_n_layers": self.last_n_layers,
                "max_dense_params": self.max_dense_params, "max_overhead": self.max_overhead}

    def _params(self, pl_module: pl.LightningModule) -> list:
        return select_parameters(pl_module, modules=self.modules,
                                 last_n_layers=self.last_n_layers)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        try:
            params = self._params(pl_module)
        except ValueError as err:
            raise MeasurementSkipped(str(err)) from err
        n = sum(p.numel() for _, p in params)
        if self.method == "dense" and n > self.max_dense_params:
            raise MeasurementSkipped(
                f"method='dense' on {n} parameters exceeds max_dense_params="
                f"{self.max_dense_params}; use method='lanczos' or a smaller block "
                "(modules=... or last_n_layers=...)")
        super().check(trainer, pl_module, batch)

    def _steps_between(self, trainer: pl.Trainer) -> int | None:
        """Optimizer steps between two measurements, when the schedule says."""
        steps = []
        per_task = getattr(trainer.datamodule, "steps_per_task", None)
        if self._has_task_events(trainer) and isinstance(per_task, int):
            steps.append(per_task * self.every_n_tasks)
        if self.every_n_train_steps:
            steps.append(self.every_n_train_steps)
        return min(steps) if steps else None

    def _predicted_step_seconds(self, pl_module: pl.LightningModule, batch: Any,
                                params: list) -> float:
        """One training step, predicted before any was timed: a forward and backward pass of
        the module's loss, scaled from the probe batch to the training batch."""
        loss_fn = self.module_loss_fn()
        start = time.perf_counter()
        with torch.enable_grad():
            torch.autograd.grad(loss_fn(pl_module, batch), [p for _, p in params],
                                allow_unused=True)
        seconds = time.perf_counter() - start
        datamodule = getattr(getattr(pl_module, "trainer", None), "datamodule", None)
        train_size = getattr(datamodule, "batch_size", None)
        probe = batch_size(batch)
        if isinstance(train_size, int) and probe:
            seconds *= train_size / probe
        return seconds

    def _max_seconds(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                     params: list) -> float | None:
        if self.max_overhead is None:
            return None
        if self.interval_seconds is not None:
            return self.max_overhead * self.interval_seconds
        steps = self._steps_between(trainer)
        if steps is None:
            return None
        return self.max_overhead * steps * self._predicted_step_seconds(pl_module, batch, params)

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                reduce: Callable[[Tensor], Tensor] | None) -> list[Any]:
        params = self._params(pl_module)
        max_seconds = self._max_seconds(trainer, pl_module, batch, params)
        if max_seconds is not None and trainer.world_size > 1:
            # Every rank must run the same number of all-reduced products: agree on the limit.
            max_seconds = float(trainer.strategy.reduce(
                torch.tensor(max_seconds, dtype=torch.float64), reduce_op="mean"))
        result = hessian_eps_rank(pl_module, self.module_loss_fn(), batch, eps=self.eps,
                                  relative=self.relative, method=self.method, params=params,
                                  reduce=reduce, max_dense_params=self.max_dense_params,
                                  num_matvecs=self.num_matvecs, max_seconds=max_seconds)
        top = result.eigenvalues.sort(descending=True).values[: self.top_k]
        out: list[Any] = [result, {"spectrum:hessian_top_eigenvalues": top}]
        if self.overlap:
            out.append(gradient_hessian_overlap(pl_module, self.module_loss_fn(), batch,
                                                params=params, reduce=reduce))
        return out
