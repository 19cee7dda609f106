"""Small Vision Transformer for 8x8 to 32x32 images."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_plasticity.models.activations import (
    ActivationName,
    activation_output_multiplier,
    make_activation,
)
from lightning_plasticity.models.base import ContinualNetwork
from lightning_plasticity.models.norms import check_input_shape, check_positive_int

ViTNormKind = Literal["layer", "none"]
VIT_NORM_KINDS: tuple[str, ...] = ("layer", "none")
POOL_KINDS: tuple[str, ...] = ("cls", "mean")


def _make_token_norm(norm: str, dim: int) -> nn.Module:
    return nn.LayerNorm(dim) if norm == "layer" else nn.Identity()


class TokenEmbedding(nn.Module):
    """Prepends the optional class token and adds the learned position embedding.

    Kept separate from the patch projection so that parameters are created (and listed by
    ``named_parameters``) in forward order: patch projection, then class token and positions.

    Args:
        num_patches: Number of patch tokens.
        dim: Token width.
        cls_token: Whether to prepend a learned class token.

    Example::

        >>> import torch
        >>> TokenEmbedding(4, 8)(torch.zeros(2, 4, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(self, num_patches: int, dim: int, cls_token: bool = True) -> None:
        super().__init__()
        # Position embeddings have no PyTorch default; truncated normal with std 0.02 follows
        # the ViT reference implementations (Dosovitskiy et al., 2021; timm).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        num_tokens = num_patches + int(cls_token)
        self.position = nn.Parameter(torch.zeros(1, num_tokens, dim))
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """Embed patch tokens.

        Args:
            x: Patch tokens of shape ``(N, num_patches, dim)``.

        Returns:
            Tokens of shape ``(N, num_patches + cls_token, dim)``.
        """
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.position


class TransformerBlock(nn.Module):
    """Pre-norm transformer encoder block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Module names: ``norm1``, ``attn`` (:class:`~torch.nn.MultiheadAttention`, batch first),
    ``norm2``, ``mlp.fc1``, ``mlp.act``, ``mlp.fc2``.

    Args:
        dim: Token width.
        heads: Attention heads; must divide ``dim``.
        hidden: Width of the MLP's hidden layer (before a ``"crelu"`` doubles it).
        activation: Activation name for the MLP.
        norm: ``"layer"`` (:class:`~torch.nn.LayerNorm`) or ``"none"`` (Identity).

    Example::

        >>> import torch
        >>> TransformerBlock(16, 4, 32, "gelu", "layer")(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, dim: int, heads: int, hidden: int, activation: str, norm: str) -> None:
        super().__init__()
        self.norm1 = _make_token_norm(norm, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = _make_token_norm(norm, dim)
        self.mlp = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(dim, hidden),
                # Tokens are (N, T, D): concatenate CReLU halves along the feature dim.
                act=make_activation(activation, dim=-1),
                fc2=nn.Linear(hidden * activation_output_multiplier(activation), dim),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: Tokens of shape ``(N, T, dim)``.

        Returns:
            Tokens of the same shape.
        """
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(ContinualNetwork):
    """Small Vision Transformer (Dosovitskiy et al., 2021) for continual-learning experiments.

    Patch embedding (``Conv2d`` with ``stride=patch_size``), learned position embedding, ``depth``
    pre-norm :class:`TransformerBlock` s, a final norm, pooling (class token or mean over tokens)
    and a linear head. Lyle et al. (2024, "Disentangling the causes of plasticity loss in neural
    networks") study plasticity loss in such small ViTs.

    Batch norm is not supported (token sequences are normalized per token); ``norm="none"``
    replaces every LayerNorm by Identity. Initialization: PyTorch defaults for the patch conv,
    the MLP Linears, the head and :class:`~torch.nn.MultiheadAttention` (Xavier-uniform input
    projection, zero biases); truncated normal (std 0.02) for class token and positions.

    Module names: ``patch_embed``, ``tokens``, ``blocks.{i}.{norm1,attn,norm2,mlp.fc1,mlp.act,
    mlp.fc2}``, ``norm``, ``head``.

    Args:
        input_shape: ``(C, H, W)`` of one example; ``H`` and ``W`` must be multiples of
            ``patch_size``.
        num_outputs: Output size of ``head``.
        patch_size: Side of the square patches.
        dim: Token width.
        depth: Number of transformer blocks (0 allowed: embedding, norm, head).
        heads: Attention heads; must divide ``dim``.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        norm: ``"layer"`` or ``"none"``.
        activation: MLP activation name accepted by
            :func:`~lightning_plasticity.models.activations.make_activation`.
        pool: ``"cls"`` (class token) or ``"mean"`` (average of all patch tokens; no class token
            is created).

    Attributes:
        head: The last Linear layer.
        feature_dim: Size of :meth:`features`' output (``dim``).

    Example::

        >>> import torch
        >>> net = ViT((3, 32, 32), 10, patch_size=4, dim=32, depth=2, heads=4)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> net.features(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 32])
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] | list[int],
        num_outputs: int,
        *,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        norm: ViTNormKind = "layer",
        activation: ActivationName = "gelu",
        pool: Literal["cls", "mean"] = "cls",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.input_shape = check_input_shape(input_shape, network=name, ndim=3)
        self.num_outputs = check_positive_int(num_outputs, "num_outputs", network=name)
        check_positive_int(patch_size, "patch_size", network=name)
        check_positive_int(dim, "dim", network=name)
        check_positive_int(depth, "depth", network=name, minimum=0)
        check_positive_int(heads, "heads", network=name)
        if norm not in VIT_NORM_KINDS:
            valid = ", ".join(repr(n) for n in VIT_NORM_KINDS)
            hint = " (batch norm is not supported for ViT)" if norm == "batch" else ""
            raise ValueError(f"{name}: unknown norm={norm!r}{hint}; valid values are {valid}.")
        if pool not in POOL_KINDS:
            valid = ", ".join(repr(p) for p in POOL_KINDS)
            raise ValueError(f"{name}: unknown pool={pool!r}; valid values are {valid}.")
        if dim % heads != 0:
            raise ValueError(f"{name}: dim={dim} must be divisible by heads={heads}.")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)):
            raise ValueError(f"{name}: mlp_ratio must be a positive number; got {mlp_ratio!r}.")
        hidden = int(round(dim * mlp_ratio))
        if hidden < 1:
            raise ValueError(
                f"{name}: mlp_ratio={mlp_ratio!r} gives an MLP hidden width of {hidden}; "
                "use mlp_ratio > 0 with dim * mlp_ratio >= 1."
            )
        activation_output_multiplier(activation)  # validates the name before building layers
        channels, height, width = self.input_shape
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"{name}: image size {height}x{width} is not a multiple of patch_size="
                f"{patch_size}; choose a patch_size dividing both (e.g. 4 for 8x8, 28x28, 32x32)."
            )
        self.pool = pool
        self.norm_kind = norm
        num_patches = (height // patch_size) * (width // patch_size)

        self.patch_embed = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.tokens = TokenEmbedding(num_patches, dim, cls_token=pool == "cls")
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, hidden, activation, norm) for _ in range(depth)
        )
        self.norm = _make_token_norm(norm, dim)
        self.feature_dim = dim
        self.head = nn.Linear(dim, self.num_outputs)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate representation: the normalized class token, or the mean token.

        Args:
            x: Batch of shape ``(N, C, H, W)``.

        Returns:
            Tensor of shape ``(N, dim)``.
        """
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, num_patches, dim)
        x = self.tokens(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 0] if self.pool == "cls" else x.mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """Compute ``head(features(x))``.

        Args:
            x: Batch of shape ``(N, C, H, W)``.

        Returns:
            Tensor of shape ``(N, num_outputs)``.
        """
        return self.head(self.features(x))
