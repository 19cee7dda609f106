"""Fully connected reference network."""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from lightning_plasticity.models.activations import (
    ActivationName,
    activation_output_multiplier,
    make_activation,
)
from lightning_plasticity.models.base import ContinualNetwork
from lightning_plasticity.models.norms import (
    NormKind,
    check_input_shape,
    check_norm,
    check_positive_int,
    make_norm,
)


class MLP(ContinualNetwork):
    """Multilayer perceptron: ``depth`` blocks of Linear -> norm -> activation, then a linear head.

    The standard network of plasticity studies on permuted/shuffled MNIST and slowly changing
    regression (Dohare et al., 2024, "Loss of plasticity in deep continual learning"; Lyle et al.,
    2023, "Understanding plasticity in neural networks"). Inputs of any shape are flattened.

    Module names are ``layers.{i}.linear``, ``layers.{i}.norm`` (``Identity`` for
    ``norm="none"``), ``layers.{i}.act`` and ``head``; parameters are created in forward order.
    Weights use PyTorch's default initialization (Kaiming-uniform with ``a=sqrt(5)``), as in the
    reference implementations of the papers above.

    Args:
        input_shape: Shape of one example without the batch dimension; flattened to
            ``prod(input_shape)`` features.
        num_outputs: Output size of ``head``.
        width: Units per hidden layer (the pre-activation width; ``"crelu"`` doubles the
            activation's output, and the next layer's input, to ``2 * width``).
        depth: Number of hidden layers; 0 gives a linear model whose features are the flattened
            input.
        activation: Activation name (see
            :func:`~lightning_plasticity.models.activations.make_activation`).
        norm: ``"none"``, ``"layer"`` (:class:`~torch.nn.LayerNorm`) or ``"batch"``
            (:class:`~torch.nn.BatchNorm1d`), applied before the activation.
        spectral_norm: Wrap every hidden Linear and the head with
            :func:`torch.nn.utils.parametrizations.spectral_norm` (one power iteration per
            training forward; Lewandowski et al., 2024, "Learning continually by spectral
            regularization", use a related constraint against plasticity loss).
        bias: Whether the hidden layers and the head have biases.

    Attributes:
        head: The last Linear layer.
        feature_dim: Size of :meth:`features`' output (the head's input size).

    Example::

        >>> import torch
        >>> net = MLP((1, 28, 28), 10, width=64, depth=2, norm="layer")
        >>> net(torch.randn(5, 1, 28, 28)).shape
        torch.Size([5, 10])
        >>> net.features(torch.randn(5, 1, 28, 28)).shape
        torch.Size([5, 64])
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] | list[int],
        num_outputs: int,
        *,
        width: int = 256,
        depth: int = 2,
        activation: ActivationName = "relu",
        norm: NormKind = "none",
        spectral_norm: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.input_shape = check_input_shape(input_shape, network=name)
        self.num_outputs = check_positive_int(num_outputs, "num_outputs", network=name)
        check_positive_int(width, "width", network=name)
        check_positive_int(depth, "depth", network=name, minimum=0)
        self.norm_kind = check_norm(norm, network=name)
        # Validates the name too, before any layer is built.
        multiplier = activation_output_multiplier(activation)

        in_features = math.prod(self.input_shape)
        layers = []
        for _ in range(depth):
            linear = nn.Linear(in_features, width, bias=bias)
            if spectral_norm:
                linear = _spectral_norm(linear)
            block = OrderedDict(
                linear=linear,
                norm=make_norm(norm, width, spatial=False),
                act=make_activation(activation, dim=1),
            )
            layers.append(nn.Sequential(block))
            in_features = width * multiplier
        self.layers = nn.ModuleList(layers)
        self.feature_dim = in_features
        head = nn.Linear(in_features, self.num_outputs, bias=bias)
        self.head: nn.Linear = _spectral_norm(head) if spectral_norm else head

    def features(self, x: Tensor) -> Tensor:
        """Penultimate representation.

        Args:
            x: Batch of shape ``(N, *input_shape)``.

        Returns:
            Tensor of shape ``(N, feature_dim)``.
        """
        h = x.flatten(1)
        for layer in self.layers:
            h = layer(h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        """Compute ``head(features(x))``.

        Args:
            x: Batch of shape ``(N, *input_shape)``.

        Returns:
            Tensor of shape ``(N, num_outputs)``.
        """
        return self.head(self.features(x))
