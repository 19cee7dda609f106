"""Spectral summaries on vectors with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_plasticity.measures.spectral_stats import (
    condition_number,
    effective_rank,
    eps_count,
)


@pytest.mark.parametrize("k", [1, 2, 7, 100])
def test_effective_rank_of_uniform_spectrum_is_its_length(k: int) -> None:
    values = torch.full((k,), 3.5, dtype=torch.float64)
    assert effective_rank(values).item() == pytest.approx(k, rel=1e-12)


def test_effective_rank_of_one_hot_is_one_and_zeros_do_not_count() -> None:
    values = torch.zeros(10, dtype=torch.float64)
    values[3] = 2.0
    assert effective_rank(values).item() == pytest.approx(1.0, rel=1e-12)
    padded = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert effective_rank(padded).item() == pytest.approx(2.0, rel=1e-12)


def test_effective_rank_closed_form_and_scale_invariance() -> None:
    # p = (1/2, 1/4, 1/4): H = 1.5 log 2, so exp(H) = 2 ** 1.5.
    values = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    assert effective_rank(values).item() == pytest.approx(2**1.5, rel=1e-12)
    assert effective_rank(1e-9 * values).item() == pytest.approx(2**1.5, rel=1e-12)
    p = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q = p / p.sum()
    expected = math.exp(-(q * q.log()).sum().item())
    assert effective_rank(p).item() == pytest.approx(expected, rel=1e-12)


def test_effective_rank_of_zero_or_empty_spectrum_is_zero() -> None:
    assert effective_rank(torch.zeros(4)).item() == 0.0
    assert effective_rank(torch.zeros(0)).item() == 0.0


def test_eps_count_absolute_and_relative() -> None:
    values = torch.tensor([10.0, 1.0, 1e-3, 1e-8, 0.0], dtype=torch.float64)
    assert eps_count(values, 0.0).item() == 4
    assert eps_count(values, 1e-6).item() == 3
    assert eps_count(values, 1.0).item() == 1  # strictly above
    assert eps_count(values, 1e-3, relative=True).item() == 2  # threshold 1e-2
    assert eps_count(values, 1e-4, relative=True).item() == 2  # threshold 1e-3 excludes 1e-3
    assert eps_count(values, 1e-5, relative=True).item() == 3
    assert eps_count(torch.zeros(0), 0.1).item() == 0
    assert eps_count(values, 0.0).dtype == torch.int64


def test_condition_number() -> None:
    assert condition_number(torch.tensor([4.0, 2.0, 1.0])).item() == pytest.approx(4.0)
    assert condition_number(torch.tensor([4.0, 0.0])).item() == math.inf
    # The smallest value 1e-3 is at most 1e-2 * 4: treated as zero.
    assert condition_number(torch.tensor([4.0, 1e-3]), eps=1e-2).item() == math.inf
    assert condition_number(torch.tensor([4.0, 1e-1]), eps=1e-2).item() == pytest.approx(40.0)
    assert math.isnan(condition_number(torch.zeros(3)).item())


def test_bad_input_raises_clear_errors() -> None:
    with pytest.raises(ValueError, match="nonnegative"):
        effective_rank(torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match="1-D"):
        eps_count(torch.ones(2, 2), 0.1)
    with pytest.raises(ValueError, match="eps must be nonnegative"):
        eps_count(torch.ones(2), -1.0)
    with pytest.raises(ValueError, match="eps must be nonnegative"):
        condition_number(torch.ones(2), eps=-1.0)
