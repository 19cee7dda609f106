"""``HessianRankCallback``: the Hessian's eps-rank, top eigenvalues and gradient overlap."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from torch import Tensor

from lightning_plasticity.callbacks.measurement import MeasurementCallback, MeasurementSkipped
from lightning_plasticity.callbacks.probe import ModuleLossFn
from lightning_plasticity.measures.grad_hessian_overlap import gradient_hessian_overlap
from lightning_plasticity.measures.hessian_spectrum import hessian_eps_rank
from lightning_plasticity.measures.hvp import DEFAULT_MAX_DENSE_PARAMS
from lightning_plasticity.measures.parameter_selection import select_parameters


class HessianRankCallback(MeasurementCallback):
    """Tracks the curvature of the training loss on a fixed probe batch of the current task.

    Lewandowski et al. ("Directions of curvature as an explanation for loss of plasticity")
    tie loss of plasticity to the loss of directions of curvature: the number of Hessian
    eigenvalues with ``|lambda| > threshold`` (the eps-rank) falls. By default this callback
    measures it at the start of every task, the point the paper measures, with
    :func:`~lightning_plasticity.measures.hessian_spectrum.hessian_eps_rank` (exact when the
    parameter block is small, deflated stochastic Lanczos quadrature otherwise) and the
    gradient-Hessian overlap ``g^T H g / (||g|| ||H g||)``.

    The loss is the module's own: ``loss_fn(pl_module, batch)`` if given, else its
    ``plasticity_loss(batch)``, else its ``training_step`` (logging suppressed). The model is
    measured in eval mode (BatchNorm uses running statistics, dropout is off) and nothing about
    training changes: parameters, gradients, optimizer state, RNG streams and modes are restored.
    Under DDP every rank measures its shard of the probe batch and Hessian-vector products are
    all-reduced, so all ranks get the single-process result on the whole probe batch.

    Logged under ``curvature/``: ``hessian_eps_rank``, ``hessian_eps_rank_normalized`` (over
    the parameters measured), ``hessian_eps_rank_error`` (0 when exact),
    ``hessian_effective_rank``, ``hessian_top_eigenvalue``, ``hessian_num_params``,
    ``grad_hessian_overlap``, ``grad_norm``, ``grad_rayleigh_quotient`` (``g^T H g / ||g||^2``);
    the top eigenvalues go to the history and to wandb as a histogram.

    Args:
        eps: eigenvalue threshold, relative to ``|lambda_max|`` when ``relative`` (default
            ``1e-3``: directions flatter than that take more than ~1000 steps to learn).
        relative: whether ``eps`` is relative to the largest-magnitude eigenvalue.
        method: ``"auto"`` (dense when the block has at most ``max_dense_params``
            parameters), ``"dense"`` (exact) or ``"lanczos"`` (estimate with error).
        modules: measure the block of these submodules (names or fnmatch patterns).
        last_n_layers: measure the block of the last ``n`` parameterised layers.
            Without ``modules`` or ``last_n_layers`` the block is every trainable parameter;
            if that is more than ``max_dense_params`` and ``method`` is not ``"lanczos"``, the
            block is the largest set of last layers that fits (said once in a warning), so the
            default measurement is exact and cheap on any model. A whole large model needs
            ``method="lanczos"`` (deflated SLQ; minutes per measurement at 1e4-1e5
            parameters on a CPU).
        max_dense_params: parameter limit of the dense method.
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
    """

    def __init__(
        self,
        eps: float = 1e-3,
        relative: bool = True,
        method: Literal["auto", "dense", "lanczos"] = "auto",
        modules: Sequence[str] | None = None,
        last_n_layers: int | None = None,
        max_dense_params: int = DEFAULT_MAX_DENSE_PARAMS,
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
        self.eps, self.relative, self.method = eps, relative, method
        self.modules = list(modules) if modules is not None else None
        self.last_n_layers, self.max_dense_params = last_n_layers, max_dense_params
        self.top_k, self.overlap = top_k, overlap

    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "eps": self.eps, "method": self.method,
                "modules": self.modules, "last_n_layers": self.last_n_layers}

    def _params(self, pl_module: pl.LightningModule) -> list:
        if self.modules is not None or self.last_n_layers is not None or self.method == "lanczos":
            return select_parameters(pl_module, modules=self.modules,
                                     last_n_layers=self.last_n_layers)
        params = select_parameters(pl_module)
        if sum(p.numel() for _, p in params) <= self.max_dense_params:
            return params
        # Too big for the exact method: the largest block of last layers that fits (the
        # partial blockwise Hessian Lewandowski et al. measure), rather than a slow estimate.
        block, n = select_parameters(pl_module, last_n_layers=1), 1
        while True:
            try:
                wider = select_parameters(pl_module, last_n_layers=n + 1)
            except ValueError:
                break
            if len(wider) == len(block) or sum(p.numel() for _, p in wider) > \
                    self.max_dense_params:
                break
            block, n = wider, n + 1
        self._note_once(f"the model has more than max_dense_params={self.max_dense_params} "
                        f"parameters: measuring the exact Hessian of the last {n} layer(s) "
                        f"({sum(p.numel() for _, p in block)} parameters). Pass method='lanczos' "
                        "to estimate the whole model's eps-rank, or choose a block with modules= "
                        "or last_n_layers=")
        return block

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

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                reduce: Callable[[Tensor], Tensor] | None) -> list[Any]:
        params = self._params(pl_module)
        result = hessian_eps_rank(pl_module, self.module_loss_fn(), batch, eps=self.eps,
                                  relative=self.relative, method=self.method, params=params,
                                  reduce=reduce, max_dense_params=self.max_dense_params)
        top = result.eigenvalues.sort(descending=True).values[: self.top_k]
        out: list[Any] = [result, {"spectrum:hessian_top_eigenvalues": top}]
        if self.overlap:
            out.append(gradient_hessian_overlap(pl_module, self.module_loss_fn(), batch,
                                                params=params, reduce=reduce))
        return out
