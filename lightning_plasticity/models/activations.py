"""Activation modules and a by-name factory for the reference networks.

Activations are always modules (never functional calls) so forward hooks, which most plasticity
measurements (dormant units, feature rank, ...) rely on, can find them by name.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor, nn

# A Literal (rather than str) lets jsonargparse reject a misspelled name while parsing the config.
ActivationName = Literal["relu", "leaky_relu", "tanh", "sigmoid", "gelu", "crelu"]
ACTIVATIONS: tuple[str, ...] = get_args(ActivationName)


class CReLU(nn.Module):
    """Concatenated ReLU: ``cat(relu(x), relu(-x))`` along ``dim``, doubling that dimension.

    Every pre-activation passes gradient through exactly one of the two halves, so a unit can
    never be dead for all inputs. Introduced by Shang et al. (2016), "Understanding and Improving
    Convolutional Neural Networks via Concatenated Rectified Linear Units", and shown to mitigate
    loss of plasticity by Abbas et al. (2023), "Loss of Plasticity in Continual Deep Reinforcement
    Learning".

    Args:
        dim: Dimension to concatenate along: 1 for ``(N, D)`` and ``(N, C, H, W)``, -1 for
            token sequences ``(N, T, D)``.

    Example::

        >>> import torch
        >>> CReLU()(torch.tensor([[1.0, -2.0]]))
        tensor([[1., 0., 0., 2.]])
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        """Apply CReLU.

        Args:
            x: Input of any shape with ``x.ndim > dim``.

        Returns:
            Tensor with dimension ``dim`` twice as large as in ``x``.
        """
        return torch.cat((torch.relu(x), torch.relu(-x)), dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        valid = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ValueError(f"Unknown activation {name!r}; valid names are {valid}.")
    return name


def make_activation(name: str, *, dim: int = 1) -> nn.Module:
    """Build an activation module by name.

    Args:
        name: One of ``"relu"``, ``"leaky_relu"`` (slope 0.01), ``"tanh"``, ``"sigmoid"``,
            ``"gelu"`` (exact erf form) or ``"crelu"``.
        dim: Concatenation dimension for ``"crelu"``; ignored by the others.

    Returns:
        A fresh (non-inplace) module. In-place activations are avoided because they overwrite the
        tensor a forward hook on the preceding layer captured.

    Raises:
        ValueError: If ``name`` is unknown; the message lists the valid names.
    """
    _check_activation(name)
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU()
    if name == "tanh":
        return nn.Tanh()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "gelu":
        return nn.GELU()
    return CReLU(dim=dim)


def activation_output_multiplier(name: str) -> int:
    """How much the activation widens its input: 2 for ``"crelu"``, 1 for the others.

    Args:
        name: An activation name accepted by :func:`make_activation`.

    Returns:
        The factor to multiply a layer's width by to get the next layer's input size.

    Raises:
        ValueError: If ``name`` is unknown.
    """
    return 2 if _check_activation(name) == "crelu" else 1
