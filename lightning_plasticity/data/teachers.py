"""Random teacher networks that produce regression targets.

Both are plain tensors drawn from an explicit generator, so a teacher is a pure function of its
seed and can be rebuilt identically in any process.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LTUTeacher:
    """Dohare et al.'s linear-threshold-unit teacher for slowly-changing regression.

    Dohare, Hernandez-Garcia, Lan, Rahman, Mahmood and Sutton, "Loss of plasticity in deep
    continual learning", Nature 2024 (and Dohare et al. 2021, "Continual backprop"). With input
    bits ``x`` in ``{0, 1}^m`` and a constant bias bit appended, hidden unit ``j`` has weights
    ``w_j`` in ``{-1, +1}^(m+1)`` and fires when ``w_j . x > theta_j`` with
    ``theta_j = (m + 1) * beta - S_j``, ``S_j`` the number of negative weights of unit ``j``;
    the output is ``sum_j v_j h_j`` with ``v_j`` in ``{-1, +1}``.

    Args:
        input_dim: number of input bits ``m``.
        hidden: number of threshold units (100 in the paper).
        beta: threshold fraction (0.7 in the paper).
        generator: source of the random signs.
    """

    def __init__(
        self, input_dim: int, hidden: int = 100, beta: float = 0.7, *, generator: torch.Generator
    ) -> None:
        signs = torch.randint(0, 2, (input_dim + 1, hidden), generator=generator) * 2 - 1
        self.weight = signs.float()
        negatives = (signs < 0).sum(dim=0).float()
        self.threshold = (input_dim + 1) * beta - negatives
        self.output = (torch.randint(0, 2, (hidden, 1), generator=generator) * 2 - 1).float()

    def __call__(self, bits: Tensor) -> Tensor:
        bias = torch.ones(bits.shape[0], 1, dtype=torch.float32, device=bits.device)
        inputs = torch.cat([bits.float().flatten(1), bias], dim=1)
        hidden = (inputs @ self.weight.to(bits.device) > self.threshold.to(bits.device)).float()
        return hidden @ self.output.to(bits.device)


class TanhTeacher:
    """A random one-hidden-layer tanh network ``f(x) = tanh(x W1 / sqrt(d)) W2 / sqrt(h)``.

    Used by ``random_targets``: every task regresses onto a freshly drawn smooth function of the
    inputs. The output is standardised to zero mean and unit variance over a reference set of
    inputs, so ``target_mean`` and ``target_scale`` set the targets' mean and scale exactly
    (Lyle et al. 2024 study the effect of a large target mean).

    Args:
        input_dim: flattened input size ``d``.
        output_dim: number of regression outputs.
        reference: inputs (already flattened and normalised) used to standardise the outputs.
        generator: source of the weights.
        hidden: hidden width ``h``.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        reference: Tensor,
        *,
        generator: torch.Generator,
        hidden: int = 64,
    ) -> None:
        self.w1 = torch.randn(input_dim, hidden, generator=generator) / input_dim**0.5
        self.w2 = torch.randn(hidden, output_dim, generator=generator) / hidden**0.5
        raw = self._raw(reference.float())
        self.mean = raw.mean(dim=0)
        self.std = raw.std(dim=0).clamp_min(1e-6)

    def _raw(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w1.to(x.device)) @ self.w2.to(x.device)

    def __call__(self, x: Tensor) -> Tensor:
        raw = self._raw(x.float().flatten(1))
        return (raw - self.mean.to(x.device)) / self.std.to(x.device)
