import math

import pytest
import torch

from lightning_plasticity.measures.feature_rank import (
    feature_gram_stats,
    feature_rank,
    feature_rank_from_gram,
    reduce_feature_gram_stats,
    srank,
)

DT = torch.float64
SPECTRUM = [5.0, 3.0, 1.0, 0.5, 0.04]


def features_with_spectrum(s: list[float], n: int = 20, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    U, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=DT))
    V, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=DT))
    return U @ torch.diag(torch.tensor(s, dtype=DT)) @ V.T


def reference_srank(s: list[float], delta: float) -> int:
    total, running = sum(s), 0.0
    for k, v in enumerate(s, start=1):
        running += v
        if running / total >= 1 - delta:
            return k
    return len(s)


def test_known_spectrum_svd_path() -> None:
    F = features_with_spectrum(SPECTRUM)
    r = feature_rank(F)
    assert r.num_examples == 20 and r.dim == 8
    assert r.singular_values.shape == (8,)
    torch.testing.assert_close(r.singular_values[:5], torch.tensor(SPECTRUM, dtype=DT))
    assert float(r.singular_values[5:].max()) < 1e-12

    p = torch.tensor(SPECTRUM, dtype=DT) / sum(SPECTRUM)
    assert r.effective_rank == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-10)

    # cumulative fractions .524 .839 .943 .9958 -> 4; squared .709 .965 .9929 -> 3
    assert r.srank == reference_srank(SPECTRUM, 0.01) == 4
    squared = feature_rank(F, squared=True)
    assert squared.srank == reference_srank([v * v for v in SPECTRUM], 0.01) == 3
    assert feature_rank(F, delta=0.2).srank == reference_srank(SPECTRUM, 0.2) == 2

    # Lyle et al.: sigma / sqrt(n) > 0.01, i.e. sigma > 0.0447 with n = 20: 0.04 drops out.
    assert r.threshold == pytest.approx(0.01 * math.sqrt(20))
    assert r.feature_rank == 4
    assert feature_rank(F, threshold="absolute").feature_rank == 5
    assert feature_rank(F, threshold="relative").feature_rank == 4  # 0.04 < 0.01 * 5
    assert feature_rank(F, threshold="relative", eps=1e-3).feature_rank == 5

    assert r.feature_norm == pytest.approx(float(F.norm(dim=1).mean()), rel=1e-12)
    assert r.scalars()["feature_rank_fraction"] == pytest.approx(4 / 8)


def test_gram_path_equals_svd_path() -> None:
    F = features_with_spectrum(SPECTRUM)
    svd = feature_rank(F, method="svd")
    gram = feature_rank(F, method="gram")
    torch.testing.assert_close(gram.singular_values, svd.singular_values, rtol=0, atol=1e-6)
    for field in ("srank", "feature_rank"):
        assert getattr(gram, field) == getattr(svd, field)
    assert gram.effective_rank == pytest.approx(svd.effective_rank, rel=1e-6)
    assert gram.feature_norm == pytest.approx(svd.feature_norm, rel=1e-12)

    # more dimensions than examples: keep min(n, d) values
    wide = features_with_spectrum([2.0, 1.0], n=3, d=10)
    assert feature_rank(wide, method="gram").singular_values.shape == (3,)
    assert feature_rank(wide).singular_values.shape == (3,)


def test_two_shards_via_gram() -> None:
    F = features_with_spectrum(SPECTRUM, seed=3)
    a, b = F[:7], F[7:]
    captured: list[torch.Tensor] = []
    reduce_feature_gram_stats(feature_gram_stats(b), lambda t: captured.append(t) or t)
    res = feature_rank(a, reduce_sum=lambda t: t + captured[0])
    ref = feature_rank(F)
    assert res.num_examples == 20
    torch.testing.assert_close(res.singular_values, ref.singular_values, rtol=0, atol=1e-6)
    assert (res.srank, res.feature_rank) == (ref.srank, ref.feature_rank)
    assert res.feature_norm == pytest.approx(ref.feature_norm, rel=1e-12)
    stats = reduce_feature_gram_stats(feature_gram_stats(a), lambda t: t + captured[0])
    assert feature_rank_from_gram(stats).srank == ref.srank
    with pytest.raises(ValueError, match="method='gram'"):
        feature_rank(a, method="svd", reduce_sum=lambda t: t)


def test_srank_edge_cases() -> None:
    assert srank(torch.ones(4), delta=0.0) == 4
    assert srank(torch.tensor([1.0, 1.0, 0.0])) == 2
    assert srank(torch.zeros(3)) == 0
    with pytest.raises(ValueError):
        srank(torch.ones(3), delta=1.0)
    zero = feature_rank(torch.zeros(5, 3))
    assert (zero.srank, zero.feature_rank, zero.effective_rank) == (0, 0, 0.0)
    with pytest.raises(ValueError, match="threshold"):
        feature_rank(torch.ones(4, 2), threshold="bogus")  # type: ignore[arg-type]
