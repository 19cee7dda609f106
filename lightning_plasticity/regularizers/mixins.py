"""Plasticity regularizers as cooperative LightningModule mixins.

Put one or more mixins *before* a LightningModule in the class bases::

    class Net(L2InitRegularizer, WassersteinInitRegularizer, MyModule):
        pass

    Net(my_arg=1, l2_init_coef=1e-3, wasserstein_coef=1e-2)

Each mixin

* takes its options as ``__init__`` keywords with names of its own (``l2_coef``,
  ``l2_init_coef``, ``wasserstein_coef``, ``l2er_coef``, ...), so LightningCLI's ``--help``, YAML
  recipes and ``save_hyperparameters`` see them; they are added to ``hparams`` when the module
  does not record them itself;
* wraps the module's ``training_step``: the module's loss (the returned tensor, or
  ``output["loss"]``) plus ``coef * penalty``, computed from the same step's parameters (and, for
  :class:`L2ERRegularizer`, the layer inputs of the same forward pass);
* logs the penalty the coefficient multiplies as ``reg/<name>``, at every logging step. With a
  coefficient of 0 the penalty is still computed (without gradient) and logged: a measurement;
* keeps its anchor, the initial parameters ``theta_0``, in the checkpoint
  (``checkpoint["regularizers_init_anchor"]``), so a resumed run regularizes towards the original
  initialization, not towards the weights it resumed from.

The penalties themselves are the pure functions of
:mod:`lightning_plasticity.regularizers.penalties`. Mixins need automatic optimization (the
penalty is added to the returned loss).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_plasticity.core.record import LayerCall, hooked
from lightning_plasticity.models.continual_module import ContinualClassifier
from lightning_plasticity.regularizers.penalties import (
    LayerReduction,
    effective_rank_penalty,
    l2_init_penalty,
    l2_penalty,
    wasserstein_init_penalty,
)

__all__ = [
    "INIT_ANCHOR_KEY",
    "L2ERRegularizer",
    "L2InitRegularizer",
    "L2InitWassersteinClassifier",
    "L2Regularizer",
    "WassersteinInitRegularizer",
]

#: Checkpoint key of the initial parameters shared by the anchored regularizers.
INIT_ANCHOR_KEY = "regularizers_init_anchor"

#: Layers whose inputs :class:`L2ERRegularizer` collects.
L2ER_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# For type checkers the mixins are LightningModules (self.log, super().training_step, ...); at
# run time they are plain classes so that they can sit in front of any LightningModule.
if TYPE_CHECKING:
    _MixinBase = pl.LightningModule
else:
    _MixinBase = object

_Term = tuple[str, float, Callable[[], Tensor]]
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_positional_counts: dict[Callable[..., Any], int | None] = {}


def _check_coef(owner: str, **coefs: float) -> None:
    for name, value in coefs.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{owner}: {name} must be a number >= 0, got {value!r}; use 0 to "
                             "only log the penalty or a positive value to regularize.")


def _is_mixin(cls: type) -> bool:
    return issubclass(cls, _RegularizerMixin) and not issubclass(cls, pl.LightningModule)


def _check_bases(cls: type) -> None:
    """Every regularizer mixin must come before the LightningModule whose step it wraps."""
    mro = cls.__mro__
    if not any(issubclass(c, pl.LightningModule) for c in mro):
        return  # still a mixin (e.g. a user's combination of mixins)
    for i, mixin in enumerate(mro):
        if not _is_mixin(mixin):
            continue
        for earlier in mro[:i]:
            # Other mixins call super().training_step, so only a module's own step hides one.
            if "training_step" not in vars(earlier) or issubclass(earlier, mixin) \
                    or _is_mixin(earlier):
                continue
            base = next((b for b in cls.__bases__
                         if earlier in b.__mro__ and not issubclass(b, mixin)), earlier)
            first = [b for b in cls.__bases__ if _is_mixin(b)]
            fixed = ", ".join(b.__name__ for b in first + [b for b in cls.__bases__
                                                             if b not in first])
            raise TypeError(
                f"{mixin.__name__} comes after {base.__name__} in the bases of {cls.__name__}, so "
                f"{base.__name__}'s training_step would hide the regularizer. Put "
                f"{mixin.__name__} before {base.__name__} in the class bases: "
                f"class {cls.__name__}({fixed}).")


class _RegularizerMixin(_MixinBase):
    """Shared mechanics: base-order check, hparams, wrapping the step's loss, logging."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_bases(cls)

    def _record_hparams(self, values: Mapping[str, Any]) -> None:
        # The module's save_hyperparameters() normally records the mixin's keywords already
        # (it reads every __init__ frame); a module that does not call it still gets them, so
        # that checkpoints and loggers show the regularization.
        initial = getattr(self, "_hparams_initial", None)
        for key, value in values.items():
            if key not in self.hparams:
                self.hparams[key] = value
                if initial is not None:
                    initial[key] = value

    def _inner_training_step(self, owner: type, args: tuple[Any, ...],
                             kwargs: dict[str, Any]) -> Any:
        """The next ``training_step`` after ``owner`` in the MRO, called with what it accepts."""
        inner = super(owner, self).training_step
        func = getattr(inner, "__func__", inner)
        if func not in _positional_counts:
            params = inspect.signature(inner).parameters.values()
            varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
            _positional_counts[func] = None if varargs else sum(p.kind in _POSITIONAL
                                                                for p in params)
        count = _positional_counts[func]
        # Lightning passes batch_idx to our (*args) signature even if the module's
        # training_step(self, batch) does not take it.
        return inner(*(args if count is None else args[:count]), **kwargs)

    def _add_penalties(self, output: Any, terms: list[_Term]) -> Any:
        """``output``'s loss plus ``coef * penalty`` for every term; logs ``reg/<name>``."""
        if output is None:  # the module skipped the batch
            return None
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(loss, Tensor):
            raise TypeError(
                f"{type(self).__name__}.training_step must return a loss tensor or a dict with a "
                f"'loss' tensor for the regularizers to add to, got {type(output).__name__}.")
        can_log = getattr(self, "_trainer", None) is not None
        for name, coef, penalty in terms:
            if coef > 0:
                value = penalty()
                loss = loss + coef * value
            else:
                with torch.no_grad():
                    value = penalty()
            if can_log:
                self.log(f"reg/{name}", value.detach().float(), on_step=True, on_epoch=False)
        if isinstance(output, Mapping):
            return {**output, "loss": loss}
        return loss

    @override
    def on_fit_start(self) -> None:
        if not self.automatic_optimization:
            raise RuntimeError(
                f"{type(self).__name__}'s regularizers add their penalty to the loss returned by "
                "training_step, which manual optimization ignores: use automatic optimization, "
                "or call the functions of lightning_plasticity.regularizers.penalties yourself.")
        super().on_fit_start()


class _InitAnchorMixin(_RegularizerMixin):
    """Captures the initial parameters once and keeps them in the checkpoint."""

    _init_anchor: dict[str, Tensor] | None
    _sorted_init_anchor: dict[str, Tensor]

    def _capture_init_anchor(self) -> None:
        self._init_anchor = {name: p.detach().clone() for name, p in self.named_parameters()
                             if p.requires_grad}
        self._sorted_init_anchor = {}

    def _ensure_init_anchor(self) -> None:
        if getattr(self, "_init_anchor", None) is None:
            self._capture_init_anchor()

    def _anchored_parameters(self) -> tuple[list[Tensor], list[Tensor], list[str]]:
        """Current parameters, their anchors (on the parameters' device) and names."""
        self._ensure_init_anchor()
        anchor = self._init_anchor
        assert anchor is not None
        named = dict(self.named_parameters())
        params, anchors = [], []
        for name, value in anchor.items():
            if name not in named:
                raise RuntimeError(
                    f"Parameter {name!r} of the initial parameters anchored by "
                    f"{type(self).__name__} no longer exists; the anchor was taken at the start "
                    "of fit (or loaded from the checkpoint) and needs the same parameter names.")
            p = named[name]
            if value.device != p.device or value.dtype != p.dtype:
                value = anchor[name] = value.to(device=p.device, dtype=p.dtype)
                self._sorted_init_anchor.pop(name, None)
            params.append(p)
            anchors.append(value)
        return params, anchors, list(anchor)

    @override
    def on_fit_start(self) -> None:
        # configure_model has built the network and a resumed run has loaded the anchor by now,
        # so this captures theta_0 exactly once: at the start of the first fit.
        self._ensure_init_anchor()
        super().on_fit_start()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if getattr(self, "_init_anchor", None) is not None:
            checkpoint[INIT_ANCHOR_KEY] = dict(self._init_anchor)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        anchor = checkpoint.get(INIT_ANCHOR_KEY)
        if anchor is None:
            rank_zero_warn(
                f"The checkpoint has no initial parameters ({INIT_ANCHOR_KEY!r}) for "
                f"{type(self).__name__}'s regularizers (it was saved without them); the weights "
                "at the start of this fit become the anchor theta_0.")
            return
        self._init_anchor = dict(anchor)
        self._sorted_init_anchor = {}


class L2Regularizer(_RegularizerMixin):
    """Adds ``l2_coef * ||theta||_2^2`` over all trainable parameters to the training loss.

    Plain L2 regularization towards the origin, the usual baseline of loss-of-plasticity studies
    (e.g. Kumar et al. 2023, Dohare et al. 2024). It is part of the loss, hence separate from
    (and, with Adam, not the same as) the optimizer's ``weight_decay``. Logged as ``reg/l2``
    (the squared norm, without the coefficient). See
    :func:`~lightning_plasticity.regularizers.penalties.l2_penalty`.

    Args:
        l2_coef: coefficient of the squared norm (>= 0; 0 only logs it).

    Example::

        >>> import tempfile
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import ContinualClassifier
        >>> from lightning_plasticity.regularizers import L2Regularizer
        >>> class Net(L2Regularizer, ContinualClassifier):
        ...     pass
        >>> dm = ContinualDataModule("digits", num_tasks=2, steps_per_task=2, batch_size=16,
        ...                          val_size=32)
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp())
        >>> model = Net(l2_coef=1e-4)
        >>> trainer.fit(model, datamodule=dm)
        >>> trainer.global_step, model.hparams.l2_coef
        (4, 0.0001)
        >>> bool(trainer.callback_metrics["reg/l2"] > 0)  # ||theta||^2, logged as reg/l2
        True
    """

    def __init__(self, *args: Any, l2_coef: float = 1e-4, **kwargs: Any) -> None:
        _check_coef("L2Regularizer", l2_coef=l2_coef)
        super().__init__(*args, **kwargs)
        self.l2_coef = float(l2_coef)
        self._record_hparams({"l2_coef": l2_coef})

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        output = self._inner_training_step(L2Regularizer, args, kwargs)
        params = [p for p in self.parameters() if p.requires_grad]
        return self._add_penalties(output, [("l2", self.l2_coef, lambda: l2_penalty(params))])


class L2InitRegularizer(_InitAnchorMixin):
    """Regenerative regularization (L2 Init): ``l2_init_coef * ||theta - theta_0||_2^2``.

    Kumar, Marklund & Van Roy, "Maintaining plasticity in continual learning via regenerative
    regularization" (2023): L2 regularization towards the initial parameters ``theta_0`` instead
    of the origin, over all trainable parameters, lets weights the current task does not need
    drift back to their initialization. ``theta_0`` is taken at the start of the first fit (after
    ``configure_model``) and saved in checkpoints. Logged as ``reg/l2_init`` (the distance, without
    the coefficient). See :func:`~lightning_plasticity.regularizers.penalties.l2_init_penalty`.

    Args:
        l2_init_coef: the paper's ``lambda`` (>= 0; 0 only logs the distance); tune it per
            problem (``recipes/l2_init.yaml`` uses 1e-3 with Adam).
        l2_init_squared: squared distance (the paper) or the unsquared norm
            ``||theta - theta_0||_2``, which some implementations use.
        l2_init_half: multiply by 1/2 (the weight-decay convention: gradient
            ``lambda * (theta - theta_0)``), as some implementations do.

    Example::

        >>> import tempfile
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import ContinualClassifier
        >>> from lightning_plasticity.regularizers import L2InitRegularizer
        >>> class Net(L2InitRegularizer, ContinualClassifier):
        ...     pass
        >>> dm = ContinualDataModule("digits", num_tasks=2, steps_per_task=2, batch_size=16,
        ...                          val_size=32)
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp())
        >>> model = Net(l2_init_coef=1e-3)
        >>> trainer.fit(model, datamodule=dm)
        >>> trainer.global_step, "reg/l2_init" in trainer.callback_metrics
        (4, True)
        >>> bool(model.l2_init_distance() > 0)  # training moved the weights away from theta_0
        True
    """

    def __init__(self, *args: Any, l2_init_coef: float = 1e-3, l2_init_squared: bool = True,
                 l2_init_half: bool = False, **kwargs: Any) -> None:
        _check_coef("L2InitRegularizer", l2_init_coef=l2_init_coef)
        super().__init__(*args, **kwargs)
        self.l2_init_coef = float(l2_init_coef)
        self.l2_init_squared, self.l2_init_half = bool(l2_init_squared), bool(l2_init_half)
        self._record_hparams({"l2_init_coef": l2_init_coef, "l2_init_squared": l2_init_squared,
                              "l2_init_half": l2_init_half})

    def l2_init_distance(self) -> Tensor:
        """The current penalty (without the coefficient), from the current parameters."""
        params, anchors, _ = self._anchored_parameters()
        return l2_init_penalty(params, anchors, squared=self.l2_init_squared,
                               half=self.l2_init_half)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._ensure_init_anchor()
        output = self._inner_training_step(L2InitRegularizer, args, kwargs)
        return self._add_penalties(output,
                                   [("l2_init", self.l2_init_coef, self.l2_init_distance)])


class WassersteinInitRegularizer(_InitAnchorMixin):
    """Keeps each tensor's weight distribution close to its initial one (Wasserstein init).

    Adds ``wasserstein_coef * sum_tensors W_2^2(p, p_0)``, where ``W_2^2`` is the squared 1-D
    Wasserstein-2 distance between the empirical distributions of a parameter tensor's current
    and initial entries: the mean squared difference of their sorted values (Lewandowski et al.
    2024, the Wasserstein initialization regularizer of "Directions of curvature as an
    explanation for loss of plasticity"). Weights may move far from their own initial values
    (any permutation of ``p_0`` costs nothing) as long as the distribution stays. The anchor is
    taken at the start of the first fit and saved in checkpoints; its sorted values are cached.
    Logged as ``reg/wasserstein_init``. See
    :func:`~lightning_plasticity.regularizers.penalties.wasserstein_init_penalty`.

    Args:
        wasserstein_coef: coefficient (>= 0; 0 only logs the distance). The penalty is a sum of
            per-tensor *means*, so it is much smaller than L2 Init's sum of squares and needs a
            larger coefficient.

    Example::

        >>> import tempfile
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import ContinualClassifier
        >>> from lightning_plasticity.regularizers import WassersteinInitRegularizer
        >>> class Net(WassersteinInitRegularizer, ContinualClassifier):
        ...     pass
        >>> dm = ContinualDataModule("digits", num_tasks=2, steps_per_task=2, batch_size=16,
        ...                          val_size=32)
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp())
        >>> model = Net(wasserstein_coef=0.1)
        >>> trainer.fit(model, datamodule=dm)
        >>> trainer.global_step, "reg/wasserstein_init" in trainer.callback_metrics
        (4, True)
        >>> bool(model.wasserstein_init_distance() > 0)
        True
    """

    def __init__(self, *args: Any, wasserstein_coef: float = 1e-2, **kwargs: Any) -> None:
        _check_coef("WassersteinInitRegularizer", wasserstein_coef=wasserstein_coef)
        super().__init__(*args, **kwargs)
        self.wasserstein_coef = float(wasserstein_coef)
        self._record_hparams({"wasserstein_coef": wasserstein_coef})

    def wasserstein_init_distance(self) -> Tensor:
        """The current penalty (without the coefficient), from the current parameters."""
        params, anchors, names = self._anchored_parameters()
        cache = self._sorted_init_anchor
        sorted_anchors = []
        for name, anchor in zip(names, anchors):
            if name not in cache:
                cache[name] = anchor.flatten().sort().values.reshape(anchor.shape)
            sorted_anchors.append(cache[name])
        return wasserstein_init_penalty(params, sorted_anchors, anchors_sorted=True)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._ensure_init_anchor()
        output = self._inner_training_step(WassersteinInitRegularizer, args, kwargs)
        return self._add_penalties(
            output, [("wasserstein_init", self.wasserstein_coef, self.wasserstein_init_distance)])


class L2ERRegularizer(_RegularizerMixin):
    """L2-ER: raise the effective rank of the layer inputs, keep the weights small.

    Adds ``l2er_coef * (-erank + l2er_l2_coef * ||theta||_2^2)`` (the L2-ER regularizer of
    Lewandowski et al.'s tau-trainability poster), where ``erank`` is the effective rank
    ``exp(H(lambda / sum(lambda)))`` (Roy & Vetterli 2007) of the second moments ``E[a a^T]`` of the
    inputs ``a`` of every ``nn.Linear`` and ``nn.Conv{1,2,3}d`` layer. The inputs are collected by
    forward hooks (:func:`lightning_plasticity.core.record.hooked`, in place only while the step
    runs) during the training step's own forward pass (no extra forward); inputs that
    do not depend on trainable parameters (the data entering the first layer) are skipped, since
    no parameter can change their rank. Each layer's rank comes from the eigenvalues of its small
    ``n x n`` (batch) Gram matrix, or the ``d x d`` second moment when the layer is narrower than
    the batch: both share the nonzero eigenvalues. Layers are combined by ``l2er_reduction``:
    ``"sum"`` adds per-layer effective ranks (each layer counts alike), ``"direct_sum"`` takes the
    effective rank of the block-diagonal matrix of all layers (pooled eigenvalues). Logged:
    ``reg/l2er`` (``-erank + l2er_l2_coef * ||theta||^2``, what ``l2er_coef`` multiplies) and
    ``reg/l2er_effective_rank`` (``erank``). See
    :func:`~lightning_plasticity.regularizers.penalties.l2er_penalty`.

    Args:
        l2er_coef: coefficient of the whole L2-ER term (>= 0; 0 only logs it).
        l2er_l2_coef: weight of ``||theta||^2`` inside the term (>= 0).
        l2er_reduction: ``"sum"`` or ``"direct_sum"`` over layers.

    Example::

        >>> import tempfile
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import ContinualClassifier
        >>> from lightning_plasticity.regularizers import L2ERRegularizer
        >>> class Net(L2ERRegularizer, ContinualClassifier):
        ...     pass
        >>> dm = ContinualDataModule("digits", num_tasks=2, steps_per_task=2, batch_size=16,
        ...                          val_size=32)
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp())
        >>> trainer.fit(Net(l2er_coef=1e-3, l2er_l2_coef=0.1), datamodule=dm)
        >>> sorted(name for name in trainer.callback_metrics if name.startswith("reg/"))
        ['reg/l2er', 'reg/l2er_effective_rank']
        >>> bool(trainer.callback_metrics["reg/l2er_effective_rank"] > 1)
        True
    """

    def __init__(self, *args: Any, l2er_coef: float = 1e-3, l2er_l2_coef: float = 0.1,
                 l2er_reduction: Literal["sum", "direct_sum"] = "sum", **kwargs: Any) -> None:
        _check_coef("L2ERRegularizer", l2er_coef=l2er_coef, l2er_l2_coef=l2er_l2_coef)
        if l2er_reduction not in ("sum", "direct_sum"):
            raise ValueError(f"L2ERRegularizer: unknown l2er_reduction {l2er_reduction!r}; "
                             "choose 'sum' or 'direct_sum'.")
        super().__init__(*args, **kwargs)
        self.l2er_coef, self.l2er_l2_coef = float(l2er_coef), float(l2er_l2_coef)
        self.l2er_reduction: LayerReduction = l2er_reduction
        self._record_hparams({"l2er_coef": l2er_coef, "l2er_l2_coef": l2er_l2_coef,
                              "l2er_reduction": l2er_reduction})

    def _l2er_layers(self) -> dict[str, nn.Module]:
        return {name: m for name, m in self.named_modules() if isinstance(m, L2ER_LAYER_TYPES)}

    @override
    def on_fit_start(self) -> None:
        if not self._l2er_layers():  # the network exists now (configure_model has run)
            rank_zero_warn(f"{type(self).__name__} has no nn.Linear or nn.Conv layer, so "
                           "L2ERRegularizer's effective-rank term is 0.")
        super().on_fit_start()

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        inputs: list[Tensor] = []

        def collect(call: LayerCall) -> None:
            if call.input is not None and call.input.requires_grad:
                inputs.append(call.input)

        with hooked(self._l2er_layers(), collect, input_graph=True):
            output = self._inner_training_step(L2ERRegularizer, args, kwargs)
        params = [p for p in self.parameters() if p.requires_grad]
        rank: list[Tensor] = []

        def penalty() -> Tensor:
            neg_rank = effective_rank_penalty(inputs, self.l2er_reduction)
            rank.append(-neg_rank.detach())
            return neg_rank + self.l2er_l2_coef * l2_penalty(params)

        output = self._add_penalties(output, [("l2er", self.l2er_coef, penalty)])
        if rank and getattr(self, "_trainer", None) is not None:
            self.log("reg/l2er_effective_rank", rank[0].float(), on_step=True, on_epoch=False)
        return output


class L2InitWassersteinClassifier(L2InitRegularizer, WassersteinInitRegularizer,
                                  ContinualClassifier):
    """:class:`~lightning_plasticity.models.ContinualClassifier` with L2 Init and Wasserstein init.

    Two composed regularizers for YAML recipes (``recipes/l2_init.yaml``): all of
    ContinualClassifier's arguments plus ``l2_init_coef``, ``l2_init_squared``, ``l2_init_half``
    (:class:`L2InitRegularizer`) and ``wasserstein_coef`` (:class:`WassersteinInitRegularizer`).
    Both share one anchor ``theta_0``.

    Example::

        >>> import tempfile
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.regularizers import L2InitWassersteinClassifier
        >>> model = L2InitWassersteinClassifier(lr=1e-2, l2_init_coef=1e-3, wasserstein_coef=0.0)
        >>> dm = ContinualDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=2,
        ...                          batch_size=16, val_size=32)
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp())
        >>> trainer.fit(model, datamodule=dm)
        >>> # wasserstein_coef=0.0: the Wasserstein distance is only logged, not added to the loss
        >>> sorted(name for name in trainer.callback_metrics if name.startswith("reg/"))
        ['reg/l2_init', 'reg/wasserstein_init']
    """
