"""Normalization factory and argument checks shared by the reference networks.

All networks take ``norm`` as one of ``"none"``, ``"layer"`` or ``"batch"``. Normalization is a
first-order factor in loss of plasticity (Lyle et al., 2023, "Understanding plasticity in neural
networks"; Lyle et al., 2024, "Disentangling the causes of plasticity loss"), so the networks make
it a single switch. ``"none"`` inserts :class:`torch.nn.Identity` so module names stay the same
across settings (``layers.0.norm`` always exists) and hooks never need to special-case it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

from torch import nn

NormKind = Literal["none", "layer", "batch"]
NORM_KINDS: tuple[str, ...] = get_args(NormKind)


def check_norm(norm: str, allowed: Sequence[str] = NORM_KINDS, *, network: str = "network") -> str:
    """Validate a ``norm`` argument.

    Args:
        norm: The requested normalization.
        allowed: The values the calling network supports.
        network: Name of the calling network, used in the error message.

    Returns:
        ``norm`` unchanged.

    Raises:
        ValueError: If ``norm`` is not in ``allowed``.
    """
    if norm not in allowed:
        valid = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{network}: unknown norm={norm!r}; valid values are {valid}.")
    return norm


def make_norm(norm: str, num_features: int, *, spatial: bool) -> nn.Module:
    """Build the normalization module for ``num_features`` channels.

    Args:
        norm: ``"none"`` (:class:`~torch.nn.Identity`), ``"layer"`` or ``"batch"``.
        num_features: Width of a vector layer, or channels of a conv layer.
        spatial: ``True`` for ``(N, C, H, W)`` activations. There ``"layer"`` is
            ``GroupNorm(1, C)``: LayerNorm over ``(C, H, W)`` with a per-channel affine, which
            (unlike :class:`~torch.nn.LayerNorm`) does not need the spatial size up front.

    Returns:
        The normalization module.

    Raises:
        ValueError: If ``norm`` is unknown.
    """
    check_norm(norm)
    if norm == "none":
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm2d(num_features) if spatial else nn.BatchNorm1d(num_features)
    return nn.GroupNorm(1, num_features) if spatial else nn.LayerNorm(num_features)


def check_input_shape(
    input_shape: Sequence[int], *, network: str = "network", ndim: int | None = None
) -> tuple[int, ...]:
    """Validate and normalize an ``input_shape`` (batch dimension excluded).

    Args:
        input_shape: Shape of one example, e.g. ``(C, H, W)`` or ``(D,)``. Lists (as parsed from
            YAML) and :class:`torch.Size` are accepted.
        network: Name of the calling network, used in error messages.
        ndim: If given, the required number of dimensions.

    Returns:
        The shape as a tuple of ints.

    Raises:
        ValueError: If the shape is empty, has non-positive or non-integer entries, or the wrong
            number of dimensions.
    """
    if isinstance(input_shape, int) or not isinstance(input_shape, Sequence):
        raise ValueError(
            f"{network}: input_shape must be a sequence of ints without the batch dimension, "
            f"e.g. (1, 28, 28) or (64,); got {input_shape!r}."
        )
    shape = tuple(input_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(
            f"{network}: input_shape must be a non-empty sequence of positive ints without the "
            f"batch dimension, e.g. (1, 28, 28) or (64,); got {input_shape!r}."
        )
    if ndim is not None and len(shape) != ndim:
        expected = "(C, H, W)" if ndim == 3 else f"{ndim} dimensions"
        raise ValueError(
            f"{network}: input_shape must be {expected} without the batch dimension; got {shape!r}."
        )
    return shape


def check_positive_int(value: int, name: str, *, network: str = "network", minimum: int = 1) -> int:
    """Validate an integer hyperparameter.

    Args:
        value: The value to check.
        name: Argument name used in the error message.
        network: Name of the calling network, used in the error message.
        minimum: Smallest allowed value.

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: If ``value`` is not an int or is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{network}: {name} must be an int >= {minimum}; got {value!r}.")
    return value
