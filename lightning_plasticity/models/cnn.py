"""Small convolutional reference network."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

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


class CNN(ContinualNetwork):
    """Conv3x3 -> norm -> activation -> 2x2 max-pool blocks, one hidden Linear, then a head.

    The kind of small ConvNet used in plasticity studies on (permuted/shuffled) MNIST and CIFAR
    (Lyle et al., 2023, "Understanding plasticity in neural networks"; Kumar et al., 2023,
    "Maintaining plasticity in continual learning via regenerative regularization").

    Pooling is skipped along any spatial dimension already of size 1, so tiny images (e.g.
    ``1x8x8`` with three or more blocks) still work. Module names are ``blocks.{i}.conv``,
    ``blocks.{i}.norm``, ``blocks.{i}.act``, ``blocks.{i}.pool``, ``fc.linear``, ``fc.norm``,
    ``fc.act`` and ``head``; parameters are created in forward order. Weights use PyTorch's default
    initialization (Kaiming-uniform with ``a=sqrt(5)``).

    Args:
        input_shape: ``(C, H, W)`` of one example.
        num_outputs: Output size of ``head``.
        channels: Output channels of each conv block (``"crelu"`` doubles each block's output).
        hidden: Units of the hidden Linear layer after flattening.
        activation: Activation name (see
            :func:`~lightning_plasticity.models.activations.make_activation`).
        norm: ``"none"``, ``"layer"`` (``GroupNorm(1, C)`` on conv maps, i.e. LayerNorm over
            ``(C, H, W)``; :class:`~torch.nn.LayerNorm` on the hidden Linear) or ``"batch"``
            (:class:`~torch.nn.BatchNorm2d` / :class:`~torch.nn.BatchNorm1d`). Applied before the
            activation.
        spectral_norm: Wrap every conv, the hidden Linear and the head with
            :func:`torch.nn.utils.parametrizations.spectral_norm`. For convs this normalizes the
            kernel reshaped to ``(out, in * 3 * 3)`` (Miyato et al., 2018), not the exact operator
            norm of the convolution.

    Attributes:
        head: The last Linear layer.
        feature_dim: Size of :meth:`features`' output (``hidden * activation multiplier``).

    Example::

        >>> import torch
        >>> net = CNN((3, 32, 32), 10, channels=(16, 32), hidden=64, norm="batch")
        >>> net(torch.randn(4, 3, 32, 32)).shape
        torch.Size([4, 10])
        >>> net.features(torch.randn(4, 3, 32, 32)).shape
        torch.Size([4, 64])
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] | list[int],
        num_outputs: int,
        *,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        activation: ActivationName = "relu",
        norm: NormKind = "none",
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.input_shape = check_input_shape(input_shape, network=name, ndim=3)
        self.num_outputs = check_positive_int(num_outputs, "num_outputs", network=name)
        if isinstance(channels, (int, str)) or not isinstance(channels, Sequence) or not channels:
            raise ValueError(
                f"{name}: channels must be a non-empty sequence of ints, e.g. (32, 64); "
                f"got {channels!r}."
            )
        for c in channels:
            check_positive_int(c, "every entry of channels", network=name)
        check_positive_int(hidden, "hidden", network=name)
        self.norm_kind = check_norm(norm, network=name)
        multiplier = activation_output_multiplier(activation)

        def maybe_sn(layer: nn.Module) -> nn.Module:
            return _spectral_norm(layer) if spectral_norm else layer

        in_channels, height, width = self.input_shape
        blocks = []
        for out_channels in channels:
            # Halve only the dimensions that can be halved; a 1-pixel dimension stays 1.
            kernel = (2 if height >= 2 else 1, 2 if width >= 2 else 1)
            pool = nn.MaxPool2d(kernel) if kernel != (1, 1) else nn.Identity()
            block = OrderedDict(
                conv=maybe_sn(nn.Conv2d(in_channels, out_channels, 3, padding=1)),
                norm=make_norm(norm, out_channels, spatial=True),
                act=make_activation(activation, dim=1),
                pool=pool,
            )
            blocks.append(nn.Sequential(block))
            in_channels = out_channels * multiplier
            height, width = height // kernel[0], width // kernel[1]
        self.blocks = nn.Sequential(*blocks)
        self.flat_dim = in_channels * height * width
        self.fc = nn.Sequential(
            OrderedDict(
                linear=maybe_sn(nn.Linear(self.flat_dim, hidden)),
                norm=make_norm(norm, hidden, spatial=False),
                act=make_activation(activation, dim=1),
            )
        )
        self.feature_dim = hidden * multiplier
        self.head: nn.Linear = maybe_sn(nn.Linear(self.feature_dim, self.num_outputs))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate representation.

        Args:
            x: Batch of shape ``(N, C, H, W)``.

        Returns:
            Tensor of shape ``(N, feature_dim)``.
        """
        return self.fc(self.blocks(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        """Compute ``head(features(x))``.

        Args:
            x: Batch of shape ``(N, C, H, W)``.

        Returns:
            Tensor of shape ``(N, num_outputs)``.
        """
        return self.head(self.features(x))
