"""ResNet-18 with the small-image (CIFAR) stem, built from torchvision's BasicBlock."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

from lightning_plasticity.models.base import ContinualNetwork
from lightning_plasticity.models.norms import (
    NormKind,
    check_input_shape,
    check_norm,
    check_positive_int,
    make_norm,
)


class BasicBlock(tv_resnet.BasicBlock):
    """torchvision's :class:`~torchvision.models.resnet.BasicBlock`, made hook-friendly.

    Same parameters and names (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``downsample``), so state
    dicts are interchangeable with torchvision's, but:

    * the shared in-place ``relu`` (called twice per block) is replaced by two non-inplace
      modules ``act1`` and ``act2``, so a forward hook sees each activation exactly once and the
      captured tensors are never overwritten;
    * the residual sum is out of place, for the same reason;
    * with ``bias=True`` (used when there is no normalization) the 3x3 convs get biases, which
      the norm's affine shift would otherwise provide.

    Args:
        inplanes: Input channels.
        planes: Output channels.
        stride: Stride of the first conv (and of ``downsample``).
        downsample: Module mapping the input to the residual shape, or ``None`` for identity.
        norm_layer: Factory ``channels -> module`` for ``bn1``/``bn2``.
        bias: Whether the 3x3 convs have biases.

    Example::

        >>> import torch
        >>> block = BasicBlock(8, 8, norm_layer=nn.BatchNorm2d)
        >>> block(torch.randn(2, 8, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        norm_layer: Callable[[int], nn.Module],
        bias: bool = False,
    ) -> None:
        super().__init__(inplanes, planes, stride, downsample, norm_layer=norm_layer)
        del self.relu
        if bias:
            # Reassigning keeps each conv's position in the module (and parameter) order.
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=True)
        self.act1 = nn.ReLU()
        self.act2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Apply the residual block.

        Args:
            x: Batch of shape ``(N, inplanes, H, W)``.

        Returns:
            Tensor of shape ``(N, planes, H // stride, W // stride)`` (rounded up).
        """
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Shortcut after the main branch, as in torchvision: modules run in registration order.
        identity = x if self.downsample is None else self.downsample(x)
        return self.act2(out + identity)


class ResNet18(ContinualNetwork):
    """ResNet-18 (He et al., 2016) with the small-image stem, for 8x8 to 32x32 inputs.

    Equivalent to ``torchvision.models.resnet18(weights=None)`` with ``conv1`` replaced by a 3x3
    stride-1 conv on ``C`` input channels, ``maxpool`` removed and ``fc`` renamed ``head``; at
    ``width=64`` and ``norm="batch"`` a torchvision state dict (``fc.*`` renamed ``head.*``)
    loads directly. The model of the CIFAR plasticity experiments of Lyle et al. (2023,
    "Understanding plasticity in neural networks") and Dohare et al. (2024, "Loss of plasticity in
    deep continual learning", continual ImageNet/CIFAR-100). torchvision's ResNet hard-codes
    64..512 channels, so stages are built here from (a hook-friendly subclass of) its
    :class:`~torchvision.models.resnet.BasicBlock` with widths ``width * (1, 2, 4, 8)``.

    Initialization follows torchvision: Kaiming-normal (``fan_out``, ReLU gain) for convs, norm
    weights 1 and biases 0, PyTorch's default for ``head``.

    Module names: ``conv1``, ``bn1``, ``relu`` (stem), ``layer{1..4}.{0,1}.{conv1,bn1,act1,conv2,
    bn2,act2,downsample}``, ``avgpool``, ``head``. The ``bn*`` names are kept from torchvision even
    when the norm is not batch norm.

    Args:
        input_shape: ``(C, H, W)`` of one example.
        num_outputs: Output size of ``head``.
        norm: ``"batch"`` (:class:`~torch.nn.BatchNorm2d`, the standard ResNet), ``"layer"``
            (``GroupNorm(1, C)``: LayerNorm over ``(C, H, W)`` with per-channel affine) or
            ``"none"`` (:class:`~torch.nn.Identity`; the 3x3 convs then get biases).
        width: Channels of the first stage; stages use ``width * (1, 2, 4, 8)``. 64 is the
            standard ResNet-18; small values such as 16 make fast tests.

    Attributes:
        head: The last Linear layer.
        feature_dim: Size of :meth:`features`' output (``8 * width``).

    Example::

        >>> import torch
        >>> net = ResNet18((3, 32, 32), 100, width=16)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 100])
        >>> net.features(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 128])
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] | list[int],
        num_outputs: int,
        *,
        norm: NormKind = "batch",
        width: int = 64,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.input_shape = check_input_shape(input_shape, network=name, ndim=3)
        self.num_outputs = check_positive_int(num_outputs, "num_outputs", network=name)
        check_norm(norm, network=name)
        check_positive_int(width, "width", network=name)

        # A partial of a module-level function (not a closure) keeps the model picklable, which
        # ddp_spawn and torch.save need.
        norm_layer = partial(make_norm, norm, spatial=True)
        # Without a norm nothing else supplies a per-channel shift, so the convs need biases.
        conv_bias = norm == "none"
        self.norm_kind = norm
        self._norm_layer = norm_layer
        self._conv_bias = conv_bias

        in_channels = self.input_shape[0]
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=conv_bias)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU()
        self._inplanes = width
        self.layer1 = self._make_layer(width, blocks=2, stride=1)
        self.layer2 = self._make_layer(2 * width, blocks=2, stride=2)
        self.layer3 = self._make_layer(4 * width, blocks=2, stride=2)
        self.layer4 = self._make_layer(8 * width, blocks=2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim = 8 * width
        self.head = nn.Linear(self.feature_dim, self.num_outputs)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        # Mirrors torchvision's ResNet._make_layer (projection shortcut when the shape changes).
        downsample = None
        if stride != 1 or self._inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes, 1, stride=stride, bias=self._conv_bias),
                self._norm_layer(planes),
            )
        layers = [
            BasicBlock(
                self._inplanes,
                planes,
                stride,
                downsample,
                norm_layer=self._norm_layer,
                bias=self._conv_bias,
            )
        ]
        self._inplanes = planes
        for _ in range(1, blocks):
            layers.append(
                BasicBlock(planes, planes, norm_layer=self._norm_layer, bias=self._conv_bias)
            )
        return nn.Sequential(*layers)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate representation (globally average-pooled last stage).

        Args:
            x: Batch of shape ``(N, C, H, W)``.

        Returns:
            Tensor of shape ``(N, 8 * width)``.
        """
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """Compute ``head(features(x))``.

        Args:
            x: Batch of shape ``(N, C, H, W)``.

        Returns:
            Tensor of shape ``(N, num_outputs)``.
        """
        return self.head(self.features(x))
