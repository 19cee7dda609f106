"""``KFACCallback``: eps-rank of the KFAC-GGN and the input features' effective rank per layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
from torch import Tensor, nn

from lightning_plasticity.callbacks.measurement import MeasurementCallback, MeasurementSkipped
from lightning_plasticity.callbacks.probe import ModuleLossFn
from lightning_plasticity.measures.kfac import kfac_eps_rank, kfac_factors


class KFACCallback(MeasurementCallback):
    """Tracks the KFAC approximation of the GGN (Martens and Grosse 2015) on a probe batch.

    Each Linear/Conv2d layer's GGN block is approximated by ``G (x) A`` with ``A`` the layer
    inputs' second moment and ``G`` the output gradients' second moment (see
    :func:`lightning_plasticity.measures.kfac.kfac_factors`). Its eigenvalues are the products of
    the factors' eigenvalues, so its eps-rank is exact and cheap even for large layers. Layers
    KFAC does not cover (LayerNorm, BatchNorm, attention) are skipped with one warning.

    Logged under ``curvature/``: ``kfac_eps_rank``, ``kfac_eps_rank_normalized`` (over the
    parameters covered) and, per layer, ``kfac_feature_effective_rank/<layer>`` (the effective
    rank of ``A``: the feature term of L2-ER).

    The probe batch must be ``(inputs, targets, ...)`` and the module's ``forward(inputs)`` must
    return the outputs the loss is computed on.

    Args:
        eps: eigenvalue threshold; relative to the largest KFAC eigenvalue when ``relative``.
        relative: whether ``eps`` is relative.
        mode: ``"exact"`` (exact GGN factor, one backward per output) or ``"mc"`` (sampled).
        loss: ``"cross_entropy"``, ``"mse"`` or ``"auto"`` (cross-entropy for integer targets).
        probe_size, loss_fn, on_task_start, on_task_end, every_n_train_steps, every_n_tasks:
            see :class:`MeasurementCallback`.

    Example::

        trainer = Trainer(callbacks=[KFACCallback(eps=1e-6)])
        trainer.fit(model, datamodule=ContinualDataModule())
    """

    def __init__(
        self,
        eps: float = 1e-6,
        relative: bool = True,
        mode: Literal["exact", "mc"] = "exact",
        loss: Literal["auto", "cross_entropy", "mse"] = "auto",
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
            raise ValueError(f"KFACCallback: eps must be > 0, got {eps}.")
        if mode not in ("exact", "mc"):
            raise ValueError(f"KFACCallback: mode must be 'exact' or 'mc', got {mode!r}.")
        if loss not in ("auto", "cross_entropy", "mse"):
            raise ValueError(
                f"KFACCallback: loss must be auto, cross_entropy or mse, got {loss!r}.")
        self.eps, self.relative, self.mode, self.loss_kind = eps, relative, mode, loss

    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "eps": self.eps, "mode": self.mode}

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2
                and isinstance(batch[0], Tensor) and isinstance(batch[1], Tensor)):
            raise MeasurementSkipped("KFAC needs (inputs, targets) probe batches")
        super().check(trainer, pl_module, batch)

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                reduce: Callable[[Tensor], Tensor] | None) -> dict[str, Any]:
        x, y = batch[0], batch[1]
        kind = self.loss_kind
        if kind == "auto":
            kind = "mse" if y.is_floating_point() else "cross_entropy"
        loss_module = nn.CrossEntropyLoss() if kind == "cross_entropy" else nn.MSELoss()
        if kind == "mse":
            y = y.reshape(x.shape[0], -1).float()
        factors = kfac_factors(pl_module, loss_module, x, y, mode=self.mode, reduce=reduce)
        if not factors:
            raise MeasurementSkipped("the model has no Linear or Conv2d layer KFAC covers")
        rank = kfac_eps_rank(factors, eps=self.eps, relative=self.relative)
        metrics: dict[str, Any] = {
            "kfac_eps_rank": rank.eps_rank,
            "kfac_eps_rank_normalized": rank.eps_rank / max(rank.num_params, 1),
            "kfac_num_params": rank.num_params,
        }
        for layer, value in rank.feature_effective_rank.items():
            metrics[f"kfac_feature_effective_rank/{layer}"] = value
        return metrics
