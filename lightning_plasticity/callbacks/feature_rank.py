"""``FeatureRankCallback``: effective rank, srank and feature rank of the penultimate features."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_plasticity.callbacks.measurement import MeasurementCallback, MeasurementSkipped
from lightning_plasticity.callbacks.probe import ModuleLossFn, record_loss_pass
from lightning_plasticity.core.layers import get_module, match_modules
from lightning_plasticity.core.reduction import reduce_stats
from lightning_plasticity.measures.feature_rank import (
    FeatureRank,
    feature_gram_stats,
    feature_rank_from_gram,
)


class FeatureRankCallback(MeasurementCallback):
    """Tracks the rank of a representation on a probe batch (Kumar et al. 2021; Lyle et al. 2022).

    The features are the inputs of the module's head, the last layer with trainable parameters
    that its own loss calls (its penultimate representation), or the inputs of the module named
    by ``layer``; they are recorded during one pass of the module's loss on the probe batch, so
    no ``forward`` is needed. Token features ``(n, T, d)`` count every token as a sample.
    Definitions (:func:`lightning_plasticity.measures.feature_rank.feature_rank`): effective rank
    ``exp(H(p))`` with ``p = sigma / sum(sigma)`` (Roy and Vetterli 2007); ``srank_delta``, the
    smallest ``k`` with ``sum_{i<=k} sigma_i / sum(sigma) >= 1 - delta`` (Kumar et al. 2021;
    ``squared=True`` uses ``sigma^2`` as other implementations do); feature rank, the number of
    singular values above ``eps`` (Lyle et al. 2022); and the mean feature norm.

    Under DDP the d x d feature Gram matrices are summed over ranks, whose eigenvalues are the
    squared singular values of the whole probe batch's features.

    Logged under ``features/``: ``effective_rank``, ``srank``, ``feature_rank``,
    ``feature_norm``, ``feature_rank_fraction``, ``srank_fraction``; the singular values go to
    the history and to wandb.

    Args:
        layer: fnmatch name of the module whose *input* is the representation (default: the
            head).
        delta: srank's ``delta``.
        squared: srank on squared singular values.
        eps: feature-rank threshold (see the measure for its scaling).
        probe_size, loss_fn, on_task_start, on_task_end, every_n_train_steps, every_n_tasks: see
            :class:`MeasurementCallback`.

    Example::

        >>> import tempfile
        >>> from functools import partial
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.callbacks import FeatureRankCallback
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import MLP, ContinualClassifier
        >>> dm = ContinualDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=2,
        ...                          batch_size=16, val_size=32)
        >>> model = ContinualClassifier(network=partial(MLP, width=16))
        >>> cb = FeatureRankCallback(probe_size=64)
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp(),
        ...                   callbacks=[cb])
        >>> trainer.fit(model, datamodule=dm)
        >>> [(h["task"], h["event"]) for h in cb.history]  # at the start of every task
        [(0, 'task_start'), (1, 'task_start')]
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("features/"))[:3]
        ['features/effective_rank', 'features/feature_norm', 'features/feature_rank']
    """

    prefix = "features"

    def __init__(
        self,
        layer: str | None = None,
        delta: float = 0.01,
        squared: bool = False,
        eps: float = 0.01,
        probe_size: int = 512,
        loss_fn: ModuleLossFn | None = None,
        on_task_start: bool = True,
        on_task_end: bool = False,
        every_n_train_steps: int | None = None,
        every_n_tasks: int = 1,
    ) -> None:
        super().__init__(probe_size=probe_size, loss_fn=loss_fn, on_task_start=on_task_start,
                         on_task_end=on_task_end, every_n_train_steps=every_n_train_steps,
                         every_n_tasks=every_n_tasks)
        if not 0 < delta < 1 or eps <= 0:
            raise ValueError(f"FeatureRankCallback: need 0 < delta < 1 and eps > 0; got "
                             f"{delta}, {eps}.")
        self.layer, self.delta, self.squared, self.eps = layer, delta, squared, eps

    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "layer": self.layer, "squared": self.squared}

    def _target(self, pl_module: pl.LightningModule, batch: Any) -> str:
        if self.layer is None:
            return self.head_name(pl_module, batch)
        try:
            return list(match_modules(pl_module, [self.layer]))[-1]
        except ValueError as err:
            raise MeasurementSkipped(f"layer={self.layer!r}: {err}") from err

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                reduce: Callable[[Tensor], Tensor] | None) -> FeatureRank:
        name = self._target(pl_module, batch)
        with torch.no_grad():
            record = record_loss_pass(pl_module, batch, self.loss_fn,
                                      {name: get_module(pl_module, name)})
        calls = [c for c in record.calls if c.input is not None]
        if not calls:
            raise MeasurementSkipped(f"the feature layer {name!r} was not called by the loss")
        x = calls[-1].input
        features = x.reshape(-1, x.shape[-1]) if x.dim() == 3 else x.flatten(1)
        stats = reduce_stats(feature_gram_stats(features), self.reducer(trainer))
        return feature_rank_from_gram(stats, delta=self.delta, squared=self.squared,
                                      eps=self.eps)
