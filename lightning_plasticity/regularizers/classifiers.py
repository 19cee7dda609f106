"""One regularizer in front of :class:`~lightning_plasticity.models.ContinualClassifier`.

Ready-made classes so that a YAML recipe (or a study's method) can name a regularized
classifier by class path; each takes ContinualClassifier's arguments plus its mixin's.
(:class:`~lightning_plasticity.regularizers.mixins.L2InitWassersteinClassifier` composes two.)

Example::

    >>> import tempfile
    >>> from lightning.pytorch import Trainer
    >>> from lightning_plasticity.data import ContinualDataModule
    >>> from lightning_plasticity.regularizers import (L2Classifier, L2ERClassifier,
    ...                                                L2InitClassifier, WassersteinInitClassifier)
    >>> logged = {}
    >>> for cls, coef in [(L2Classifier, {"l2_coef": 1e-4}), (L2InitClassifier, {}),
    ...                   (WassersteinInitClassifier, {}), (L2ERClassifier, {})]:
    ...     dm = ContinualDataModule("digits", num_tasks=1, steps_per_task=2, batch_size=16,
    ...                              val_size=32)
    ...     trainer = Trainer(max_steps=2, accelerator="cpu", logger=False,
    ...                       enable_checkpointing=False, enable_progress_bar=False,
    ...                       enable_model_summary=False, default_root_dir=tempfile.mkdtemp())
    ...     trainer.fit(cls(lr=1e-2, **coef), datamodule=dm)
    ...     logged[cls.__name__] = sorted(k for k in trainer.callback_metrics if k[:4] == "reg/")
    >>> logged  # doctest: +NORMALIZE_WHITESPACE
    {'L2Classifier': ['reg/l2'], 'L2InitClassifier': ['reg/l2_init'],
     'WassersteinInitClassifier': ['reg/wasserstein_init'],
     'L2ERClassifier': ['reg/l2er', 'reg/l2er_effective_rank']}
"""

from __future__ import annotations

from lightning_plasticity.models import ContinualClassifier
from lightning_plasticity.regularizers.mixins import (
    L2ERRegularizer,
    L2InitRegularizer,
    L2Regularizer,
    WassersteinInitRegularizer,
)

__all__ = ["L2Classifier", "L2ERClassifier", "L2InitClassifier", "WassersteinInitClassifier"]


class L2Classifier(L2Regularizer, ContinualClassifier):
    """ContinualClassifier + :class:`L2Regularizer` (``l2_coef``)."""


class L2InitClassifier(L2InitRegularizer, ContinualClassifier):
    """ContinualClassifier + :class:`L2InitRegularizer` (``l2_init_coef``, Kumar et al. 2023)."""


class WassersteinInitClassifier(WassersteinInitRegularizer, ContinualClassifier):
    """ContinualClassifier + :class:`WassersteinInitRegularizer` (``wasserstein_coef``,
    Lewandowski et al. 2024)."""


class L2ERClassifier(L2ERRegularizer, ContinualClassifier):
    """ContinualClassifier + :class:`L2ERRegularizer` (``l2er_coef``, ``l2er_l2_coef``; the
    tau-trainability poster)."""
