"""Reference networks and plain LightningModules for continual streams."""

from lightning_plasticity.models.activations import CReLU, make_activation
from lightning_plasticity.models.cnn import CNN
from lightning_plasticity.models.continual_module import (
    ContinualClassifier,
    ContinualRegressor,
    NetworkFactory,
)
from lightning_plasticity.models.mlp import MLP
from lightning_plasticity.models.resnet import ResNet18
from lightning_plasticity.models.vit import ViT

__all__ = [
    "CNN",
    "MLP",
    "CReLU",
    "ContinualClassifier",
    "ContinualRegressor",
    "NetworkFactory",
    "ResNet18",
    "ViT",
    "make_activation",
]
