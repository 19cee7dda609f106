"""Plain LightningModules for continual streams: ``ContinualClassifier``, ``ContinualRegressor``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_plasticity.models.base import ContinualNetwork
from lightning_plasticity.models.categorical_regression import (
    BinnedNetworkFactory,
    categorical_regression_loss,
    expected_value,
    target_distribution,
)
from lightning_plasticity.models.mlp import MLP

#: Builds a network from ``(input_shape, num_outputs)``; in YAML, a class path plus init args.
#: The package's networks come first so their short names (``MLP``) are not ambiguous with other
#: libraries' classes of the same name (``torchvision.ops.MLP``); any nn.Module class works too.
NetworkFactory = (
    Callable[[tuple[int, ...], int], ContinualNetwork] | Callable[[tuple[int, ...], int], nn.Module]
)
OptimizerName = Literal["adam", "adamw", "sgd", "rmsprop"]


class _ContinualModule(pl.LightningModule):
    """Shared by the classifier and the regressor: network construction, optimizer, steps."""

    def __init__(
        self,
        network: NetworkFactory | None = None,
        input_shape: Sequence[int] | None = None,
        num_outputs: int | None = None,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
    ) -> None:
        super().__init__()
        if optimizer not in ("adam", "adamw", "sgd", "rmsprop"):
            raise ValueError(
                f"Unknown optimizer {optimizer!r}. Choose adam, adamw, sgd or rmsprop.")
        if lr <= 0 or eps <= 0 or weight_decay < 0 or momentum < 0:
            raise ValueError(
                f"Need lr > 0, eps > 0, weight_decay >= 0 and momentum >= 0; got lr={lr}, "
                f"eps={eps}, weight_decay={weight_decay}, momentum={momentum}.")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Adam betas must be in [0, 1), got {tuple(betas)}.")
        self.save_hyperparameters()
        self._network_factory: NetworkFactory = network if network is not None else MLP
        self.network: nn.Module | None = None
        if input_shape is not None and num_outputs is not None:
            self.network = self._network_factory(tuple(input_shape), int(num_outputs))

    #: whether the module expects a regression stream (checked against the data module)
    is_regressor = False

    @override
    def configure_model(self) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        stream_regression = getattr(dm, "is_regression", None)
        if stream_regression is not None and bool(stream_regression) != self.is_regressor:
            name, task = type(self).__name__, getattr(dm, "task_name", "?")
            other = "ContinualRegressor" if stream_regression else "ContinualClassifier"
            raise ValueError(
                f"{name} cannot learn the {'regression' if stream_regression else 'classification'}"
                f" stream task={task!r} (its loss would be meaningless, e.g. exactly 0); use "
                f"{other}, or a task of the other kind.")
        if self.network is not None:
            return
        if dm is None or not hasattr(dm, "input_shape") or not hasattr(dm, "num_outputs"):
            raise ValueError(
                f"{type(self).__name__} needs input_shape and num_outputs, either as arguments or "
                "from a ContinualDataModule passed to Trainer.fit(datamodule=...)."
            )
        input_shape, num_outputs = tuple(dm.input_shape), int(dm.num_outputs)
        # Recorded so that checkpoints rebuild the same network with load_from_checkpoint.
        self.hparams["input_shape"], self.hparams["num_outputs"] = input_shape, num_outputs
        self.network = self._network_factory(input_shape, num_outputs)

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self.network is None:
            raise RuntimeError("The network is not built yet: pass input_shape and num_outputs "
                               "or call configure_model() inside a Trainer.")
        return self.network(x)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def plasticity_loss(self, batch: Any) -> Tensor:
        """The training loss on ``batch``; used by the measurement callbacks."""
        x, y = batch[0], batch[1]
        return self.loss(self(x), y)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = batch[0], batch[1]
        outputs = self(x)
        return {"loss": self.loss(outputs, y), "logits": outputs.detach()}

    def _val_metrics(self, outputs: Tensor, y: Tensor) -> dict[str, Tensor]:
        return {"val_loss": self.loss(outputs, y)}

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch[0], batch[1]
        suffix = "" if dataloader_idx == 0 else f"_prev{dataloader_idx}"
        for name, value in self._val_metrics(self(x), y).items():
            # Every rank evaluates its own shard, so syncing the mean is safe.
            self.log(f"task/{name}{suffix}", value, on_step=False, on_epoch=True,
                     sync_dist=True, add_dataloader_idx=False, batch_size=x.shape[0])

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "adam":
            return torch.optim.Adam(params, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
                                    weight_decay=hp.weight_decay)
        if hp.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
                                     weight_decay=hp.weight_decay)
        if hp.optimizer == "rmsprop":
            return torch.optim.RMSprop(params, lr=hp.lr, eps=hp.eps, alpha=hp.betas[1],
                                       weight_decay=hp.weight_decay, momentum=hp.momentum)
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum,
                               weight_decay=hp.weight_decay)


class ContinualClassifier(_ContinualModule):
    """A classifier for any classification task stream (cross-entropy loss).

    ``training_step`` returns ``{"loss", "logits"}`` so the data module can log task accuracy.
    Validation logs ``task/val_loss`` and ``task/val_accuracy`` (``..._prev{j}`` for the task
    ``j`` tasks back).

    Args:
        network: builds the network from ``(input_shape, num_outputs)``; default
            :class:`~lightning_plasticity.models.MLP`. In YAML: ``class_path: MLP`` with
            ``init_args`` for the rest.
        input_shape: input shape without batch dimension; taken from the data module if omitted.
        num_outputs: number of classes; taken from the data module if omitted.
        optimizer: ``adam``, ``adamw``, ``sgd`` or ``rmsprop``.
        lr: learning rate.
        betas: Adam's ``(beta1, beta2)`` (``alpha = beta2`` for RMSprop). Lyle et al. 2023
            ("Understanding plasticity in neural networks") found Adam's second-moment estimate
            lags behind non-stationary targets; their fix is a larger ``eps`` and/or
            ``beta2 = beta1``.
        eps: Adam's epsilon.
        weight_decay: the optimizer's weight decay (coupled for Adam/SGD, decoupled for AdamW).
        momentum: SGD/RMSprop momentum.
        label_smoothing: cross-entropy label smoothing.

    Example::

        >>> import tempfile
        >>> from functools import partial
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import MLP, ContinualClassifier
        >>> model = ContinualClassifier(network=partial(MLP, width=128), lr=1e-3)
        >>> dm = ContinualDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=2,
        ...                          batch_size=16, val_size=32)
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp())
        >>> trainer.fit(model, datamodule=dm)
        >>> model.hparams.input_shape, model.hparams.num_outputs  # taken from the data module
        ((1, 8, 8), 10)
        >>> trainer.global_step, len(dm.task_history)
        (4, 2)
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("task/val"))
        ['task/val_accuracy', 'task/val_loss']
    """

    def __init__(
        self,
        network: NetworkFactory | None = None,
        input_shape: Sequence[int] | None = None,
        num_outputs: int | None = None,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(network, input_shape, num_outputs, optimizer, lr, betas, eps,
                         weight_decay, momentum)
        self.label_smoothing = label_smoothing

    @override
    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, label_smoothing=self.label_smoothing)

    @override
    def _val_metrics(self, outputs: Tensor, y: Tensor) -> dict[str, Tensor]:
        return {"val_loss": self.loss(outputs, y),
                "val_accuracy": (outputs.argmax(dim=-1) == y).float().mean()}


class ContinualRegressor(_ContinualModule):
    """A regressor for ``random_targets``, ``slowly_changing_regression`` and other regression
    streams: mean squared error, or a scale-invariant categorical loss.

    With ``loss="mse"`` (default) the network has one output per target and the loss is the mean
    squared error over all outputs. With ``loss="hl_gauss"`` or ``"two_hot"`` each target is
    classified over ``num_bins`` bins spanning ``value_range``: the network has
    ``num_outputs * num_bins`` outputs (``num_bins`` consecutive logits per target), the training
    loss is the cross-entropy with the target's HL-Gauss or two-hot distribution, and predictions
    are the expected bin center (:meth:`decode`). This is Lyle et al.'s fix for plasticity loss
    from large regression targets ("Disentangling the causes of plasticity loss in neural
    networks", arXiv:2402.18762, 2024), with HL-Gauss from Imani & White 2018 / Farebrother et
    al. 2024 ("Stop regressing") and two-hot from Schrittwieser et al. 2020 (MuZero); see
    :mod:`lightning_plasticity.models.categorical_regression`. The bins' outermost *centers* are
    ``value_range`` (``endpoints="centers"`` there). ``task/val_loss`` is always the mean squared
    error of the decoded predictions, so runs with different losses compare directly;
    ``training_step`` and :meth:`plasticity_loss` (the measurement callbacks') use the training
    loss.

    Args: as :class:`ContinualClassifier` (without ``label_smoothing``), plus:
        num_outputs: number of regression targets (the network gets ``num_outputs * num_bins``
            outputs with a categorical loss); taken from the data module if omitted.
        loss: ``"mse"``, ``"hl_gauss"`` or ``"two_hot"``.
        value_range: ``(value_min, value_max)`` of the bins, required for the categorical
            losses; targets outside it are clipped. ``random_targets`` are
            ``target_mean + target_scale * z`` with ``z`` standardised, so e.g.
            ``(target_mean - 4 * target_scale, target_mean + 4 * target_scale)``.
        num_bins: bins per target of the categorical losses (at least 2).
        sigma: HL-Gauss standard deviation in target units; default 0.75 bin widths
            (Farebrother et al. 2024). Only for ``loss="hl_gauss"``.

    Example::

        >>> import tempfile
        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import ContinualRegressor
        >>> dm = ContinualDataModule("regression_teacher", "slowly_changing_regression",
        ...                          num_tasks=2, steps_per_task=2, batch_size=16, val_size=32,
        ...                          synthetic_num_examples=256)
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp())
        >>> model = ContinualRegressor(optimizer="sgd", lr=0.01)
        >>> trainer.fit(model, datamodule=dm)
        >>> model.hparams.input_shape, model.hparams.num_outputs  # 20 input bits, 1 target
        ((20,), 1)
        >>> trainer.global_step, len(dm.task_history)
        (4, 2)
        >>> "task/val_loss" in trainer.callback_metrics
        True

        A categorical loss: 2 targets, 11 bins each.

        >>> model = ContinualRegressor(input_shape=(4,), num_outputs=2, loss="hl_gauss",
        ...                            value_range=(-5.0, 5.0), num_bins=11)
        >>> outputs = model(torch.zeros(3, 4))
        >>> outputs.shape, model.decode(outputs).shape
        (torch.Size([3, 22]), torch.Size([3, 2]))
        >>> model.loss(outputs, torch.zeros(3, 2)).ndim
        0
    """

    is_regressor = True

    def __init__(
        self,
        network: NetworkFactory | None = None,
        input_shape: Sequence[int] | None = None,
        num_outputs: int | None = None,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        loss: Literal["mse", "hl_gauss", "two_hot"] = "mse",
        value_range: tuple[float, float] | None = None,
        num_bins: int = 51,
        sigma: float | None = None,
    ) -> None:
        if loss not in ("mse", "hl_gauss", "two_hot"):
            raise ValueError(f"Unknown loss {loss!r}. Choose 'mse', 'hl_gauss' or 'two_hot'.")
        if loss == "mse":
            if value_range is not None or sigma is not None:
                raise ValueError(
                    "value_range and sigma only apply to loss='hl_gauss' or 'two_hot'; drop them "
                    "or choose a categorical loss.")
            factory = network
            bins: tuple[float, float] | None = None
        else:
            if value_range is None or len(value_range) != 2:
                raise ValueError(
                    f"loss={loss!r} needs value_range=(value_min, value_max), the range its "
                    f"{num_bins} bins span (targets outside are clipped); got {value_range!r}.")
            bins = (float(value_range[0]), float(value_range[1]))
            if loss == "two_hot" and sigma is not None:
                raise ValueError(
                    f"sigma={sigma!r} only applies to loss='hl_gauss'; drop it for 'two_hot'.")
            # Checks num_bins, value_range and sigma with the same messages as the loss itself.
            target_distribution(torch.zeros(1), *bins, num_bins, kind=loss, sigma=sigma)
            factory = BinnedNetworkFactory(network if network is not None else MLP, num_bins)
        # hparams record the arguments as given (network, num_outputs = number of targets):
        # save_hyperparameters lets this frame's arguments override the base class's.
        super().__init__(factory, input_shape, num_outputs, optimizer, lr, betas, eps,
                         weight_decay, momentum)
        self.loss_kind = loss
        self.value_range = bins
        self.num_bins = num_bins
        self.sigma = sigma

    def _logits(self, outputs: Tensor) -> Tensor:
        if outputs.shape[-1] % self.num_bins:
            raise ValueError(
                f"loss={self.loss_kind!r} needs num_targets * num_bins network outputs, got "
                f"{outputs.shape[-1]} for num_bins={self.num_bins}; let the regressor build the "
                "network (pass the factory as network=...).")
        return outputs.reshape(*outputs.shape[:-1], -1, self.num_bins)

    def decode(self, outputs: Tensor) -> Tensor:
        """Predictions from network outputs: the outputs themselves for ``loss="mse"``, else
        the expected bin center per target, shape ``(batch, num_targets)``."""
        if self.value_range is None:
            return outputs
        return expected_value(self._logits(outputs), *self.value_range, self.num_bins)

    @override
    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if self.value_range is None:
            return F.mse_loss(outputs, targets.reshape(outputs.shape).to(outputs.dtype))
        logits = self._logits(outputs)
        return categorical_regression_loss(
            logits, targets.reshape(logits.shape[:-1]), *self.value_range, self.num_bins,
            kind=self.loss_kind, sigma=self.sigma)  # type: ignore[arg-type]

    @override
    def _val_metrics(self, outputs: Tensor, y: Tensor) -> dict[str, Tensor]:
        if self.value_range is None:
            return super()._val_metrics(outputs, y)
        predictions = self.decode(outputs)
        return {"val_loss": F.mse_loss(predictions, y.reshape(predictions.shape).to(
            predictions.dtype))}

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = batch[0], batch[1]
        return {"loss": self.loss(self(x), y)}
