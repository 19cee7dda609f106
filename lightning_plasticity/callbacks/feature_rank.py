"""``FeatureRankCallback``: effective rank, srank and feature rank of the penultimate features."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_plasticity.callbacks.measurement import MeasurementCallback, MeasurementSkipped
from lightning_plasticity.measures.feature_rank import feature_rank


def _capture_input(module: nn.Module, target: nn.Module, inputs: Any) -> Tensor:
    captured: list[Tensor] = []
    handle = target.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            module(inputs)
    finally:
        handle.remove()
    if not captured:
        raise MeasurementSkipped("the feature layer was not called by forward()")
    return captured[-1].flatten(1)


class FeatureRankCallback(MeasurementCallback):
    """Tracks the rank of a representation on a probe batch (Kumar et al. 2021; Lyle et al. 2022).

    The features are the inputs of the last ``nn.Linear`` of the module (its penultimate
    representation), or the inputs of the module named by ``layer``. Definitions
    (:func:`lightning_plasticity.measures.feature_rank.feature_rank`): effective rank
    ``exp(H(p))`` with ``p = sigma / sum(sigma)`` (Roy and Vetterli 2007); ``srank_delta``, the
    smallest ``k`` with ``sum_{i<=k} sigma_i / sum(sigma) >= 1 - delta`` (Kumar et al. 2021;
    ``squared=True`` uses ``sigma^2`` as other implementations do); feature rank, the number of
    singular values above ``eps`` (Lyle et al. 2022); and the mean feature norm.

    Under DDP the d x d feature Gram matrices are summed over ranks, whose eigenvalues are the
    squared singular values of the whole probe batch's features.

    Logged under ``features/``: ``effective_rank``, ``srank``, ``feature_rank``,
    ``feature_norm``; the singular values go to the history and to wandb.

    Args:
        layer: fnmatch name of the module whose *input* is the representation (default: the last
            ``nn.Linear``).
        delta: srank's ``delta``.
        squared: srank on squared singular values.
        eps: feature-rank threshold (see the measure for its scaling).
        probe_size, on_task_start, on_task_end, every_n_train_steps, every_n_tasks: see
            :class:`MeasurementCallback`.

    Example::

        Trainer(callbacks=[FeatureRankCallback()]).fit(model, datamodule=dm)
    """

    prefix = "features"

    def __init__(
        self,
        layer: str | None = None,
        delta: float = 0.01,
        squared: bool = False,
        eps: float = 0.01,
        probe_size: int = 512,
        on_task_start: bool = True,
        on_task_end: bool = False,
        every_n_train_steps: int | None = None,
        every_n_tasks: int = 1,
    ) -> None:
        super().__init__(probe_size=probe_size, on_task_start=on_task_start,
                         on_task_end=on_task_end, every_n_train_steps=every_n_train_steps,
                         every_n_tasks=every_n_tasks)
        if not 0 < delta < 1 or eps <= 0:
            raise ValueError(f"FeatureRankCallback: need 0 < delta < 1 and eps > 0; got "
                             f"{delta}, {eps}.")
        self.layer, self.delta, self.squared, self.eps = layer, delta, squared, eps

    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "layer": self.layer, "squared": self.squared}

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.layer is None:
            linears = [m for m in pl_module.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise MeasurementSkipped("the module has no nn.Linear; pass layer=")
            return linears[-1]
        names = [n for n, _ in pl_module.named_modules() if n]
        matches = [m for n, m in pl_module.named_modules() if n and fnmatch.fnmatchcase(n,
                                                                                    self.layer)]
        if not matches:
            raise MeasurementSkipped(f"layer={self.layer!r} matches no submodule; available: "
                                     f"{', '.join(names[:12])}")
        return matches[-1]

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        self._target(pl_module)

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                reduce: Callable[[Tensor], Tensor] | None) -> dict[str, Any]:
        features = _capture_input(pl_module, self._target(pl_module), self.inputs_of(batch))
        result = feature_rank(features, delta=self.delta, squared=self.squared, eps=self.eps,
                              reduce_sum=self._reduce_sum_fn(trainer))
        return {"effective_rank": result.effective_rank, "srank": result.srank,
                "feature_rank": result.feature_rank, "feature_norm": result.feature_norm,
                "spectrum:singular_values": result.singular_values}
