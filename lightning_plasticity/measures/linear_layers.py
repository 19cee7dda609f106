"""``Linear`` and ``Conv2d`` layers as matrices: what KFAC and the per-layer eNTK share.

A supported layer computes ``y_np = W a_np + b`` at ``P`` weight-sharing positions ``p``: the
unfolded patches of a convolution, the extra leading dimensions of a ``Linear`` on
``(N, ..., in)`` inputs, or a single position. These helpers lay the layer's input out as
``(N, P, in)`` patches and its output (or output gradient) as ``(N, P, out)`` in the same order.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["input_patches", "is_supported_layer", "layer_bias", "output_positions"]


def is_supported_layer(module: nn.Module) -> bool:
    """A plain ``Linear`` / ``Conv2d`` whose weight is a direct parameter used by the stock forward.

    Subclasses with a custom forward, parametrized weights (``weight`` then lives in a
    ``ParametrizationList``) and grouped convolutions have a different gradient structure.

    Example::

        >>> from torch import nn
        >>> is_supported_layer(nn.Linear(2, 3)), is_supported_layer(nn.Conv2d(4, 4, 3, groups=2))
        (True, False)
    """
    if isinstance(module, nn.Linear):
        stock = type(module).forward is nn.Linear.forward
    elif isinstance(module, nn.Conv2d):
        stock = (
            type(module).forward is nn.Conv2d.forward
            and type(module)._conv_forward is nn.Conv2d._conv_forward
            and module.groups == 1
        )
    else:
        return False
    return stock and module._parameters.get("weight") is not None


def layer_bias(module: nn.Module) -> Tensor | None:
    """The layer's bias parameter, or ``None``."""
    return module._parameters.get("bias")


def input_patches(module: nn.Module, x: Tensor) -> Tensor:
    """Layer input as ``(N, P, D)``: ``P`` weight-sharing positions of ``D`` features each.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> input_patches(nn.Conv2d(2, 5, 3, padding=1), torch.zeros(4, 2, 6, 6)).shape
        torch.Size([4, 36, 18])
    """
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if x.dim() != 4:
        raise ValueError(f"Conv2d inputs must be batched (N, C, H, W); got shape {tuple(x.shape)}.")
    # Padding explicitly covers padding="same"/"valid" and non-zero padding modes alike.
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    return patches.transpose(1, 2)


def output_positions(module: nn.Module, y: Tensor) -> Tensor:
    """Layer output (or its gradient) as ``(N, P, O)``, positions ordered like the patches."""
    if isinstance(module, nn.Linear):
        return y.reshape(y.shape[0], -1, y.shape[-1])
    return y.flatten(2).transpose(1, 2)
