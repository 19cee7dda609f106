"""``KFACCallback``: eps-rank of the KFAC-GGN and the input features' effective rank per layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
from torch import Tensor, nn

from lightning_plasticity.callbacks.measurement import MeasurementCallback, MeasurementSkipped
from lightning_plasticity.callbacks.probe import ModuleLossFn
from lightning_plasticity.core.batch import tensor_leaves
from lightning_plasticity.measures.kfac import KFACEpsRank, kfac_eps_rank, kfac_factors

_PREFIX = "module."


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

    The loss is the module's own (``loss_fn``, ``plasticity_loss`` or ``training_step``) and the
    output is its head's (the last trainable layer the loss calls), recorded during that pass:
    no ``forward`` is needed and any batch structure works. ``H_n``, the Hessian of the loss
    w.r.t. example ``n``'s head output, comes from double backpropagation, assuming (as the GGN
    does) that the loss sums per-example terms. ``loss="cross_entropy"``/``"mse"`` instead use
    that closed form on the head output (needed for ``mode="mc"``).

    Args:
        eps: eigenvalue threshold; relative to the largest KFAC eigenvalue when ``relative``.
        relative: whether ``eps`` is relative.
        mode: ``"exact"`` (exact GGN factor, one backward per output) or ``"mc"`` (sampled).
        loss: ``"module"`` (the module's own loss, default), ``"cross_entropy"`` or ``"mse"``.
        probe_size, loss_fn, on_task_start, on_task_end, every_n_train_steps, every_n_tasks:
            see :class:`MeasurementCallback`.

    Example::

        >>> import tempfile
        >>> from functools import partial
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.callbacks import KFACCallback
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import MLP, ContinualClassifier
        >>> dm = ContinualDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=2,
        ...                          batch_size=16, val_size=32)
        >>> model = ContinualClassifier(network=partial(MLP, width=16))
        >>> cb = KFACCallback(eps=1e-6, probe_size=32)
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp(),
        ...                   callbacks=[cb])
        >>> trainer.fit(model, datamodule=dm)
        >>> [(h["task"], h["event"]) for h in cb.history]  # at the start of every task
        [(0, 'task_start'), (1, 'task_start')]
        >>> int(trainer.callback_metrics["curvature/kfac_num_params"])  # every Linear layer
        1482
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("curvature/kfac_eps"))
        ['curvature/kfac_eps_rank', 'curvature/kfac_eps_rank_normalized']
    """

    def __init__(
        self,
        eps: float = 1e-6,
        relative: bool = True,
        mode: Literal["exact", "mc"] = "exact",
        loss: Literal["module", "cross_entropy", "mse"] = "module",
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
        if loss not in ("module", "cross_entropy", "mse"):
            raise ValueError(
                f"KFACCallback: loss must be module, cross_entropy or mse, got {loss!r}.")
        if mode == "mc" and loss == "module":
            raise ValueError("KFACCallback: mode='mc' samples targets from the predictive "
                             "distribution, which needs loss='cross_entropy' or loss='mse'.")
        self.eps, self.relative, self.mode, self.loss_kind = eps, relative, mode, loss

    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "eps": self.eps, "mode": self.mode}

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                reduce: Callable[[Tensor], Tensor] | None) -> KFACEpsRank:
        model = self.head_output(pl_module, batch)
        if self.loss_kind == "module":
            loss_module = None
        else:
            loss_module = nn.CrossEntropyLoss() if self.loss_kind == "cross_entropy" else \
                nn.MSELoss()
        if any(not t.is_floating_point() for t in tensor_leaves(batch)) and \
                self.loss_kind == "mse":
            self._note_once("loss='mse' assumes the head output is the regression prediction")
        factors = kfac_factors(model, loss_module, batch, mode=self.mode, reduce=reduce)
        if not factors:
            raise MeasurementSkipped("the model has no Linear or Conv2d layer KFAC covers")
        # Layers are named as in pl_module (without HeadOutput's "module." prefix).
        factors = {name.removeprefix(_PREFIX): f for name, f in factors.items()}
        return kfac_eps_rank(factors, eps=self.eps, relative=self.relative)
