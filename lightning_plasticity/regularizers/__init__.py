"""Plasticity regularizers: pure penalty functions and LightningModule mixins."""

from lightning_plasticity.regularizers.classifiers import (
    L2Classifier,
    L2ERClassifier,
    L2InitClassifier,
    WassersteinInitClassifier,
)
from lightning_plasticity.regularizers.mixins import (
    INIT_ANCHOR_KEY,
    L2ERRegularizer,
    L2InitRegularizer,
    L2InitWassersteinClassifier,
    L2Regularizer,
    WassersteinInitRegularizer,
)
from lightning_plasticity.regularizers.penalties import (
    LayerReduction,
    effective_rank_penalty,
    l2_init_penalty,
    l2_penalty,
    l2er_penalty,
    second_moment_effective_rank,
    wasserstein_init_penalty,
)

__all__ = [
    "INIT_ANCHOR_KEY",
    "L2Classifier",
    "L2ERClassifier",
    "L2InitClassifier",
    "WassersteinInitClassifier",
    "L2ERRegularizer",
    "L2InitRegularizer",
    "L2InitWassersteinClassifier",
    "L2Regularizer",
    "LayerReduction",
    "WassersteinInitRegularizer",
    "effective_rank_penalty",
    "l2_init_penalty",
    "l2_penalty",
    "l2er_penalty",
    "second_moment_effective_rank",
    "wasserstein_init_penalty",
]
