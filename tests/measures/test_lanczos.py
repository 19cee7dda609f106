import math

import pytest
import torch

from lightning_plasticity.measures.lanczos import (
    count_from_slq,
    lanczos,
    slq,
    slq_count_above,
    slq_density,
    top_eigenpairs,
)
from lightning_plasticity.measures.linear_operator import (
    CallableOperator,
    MatrixOperator,
    ProjectedOperator,
)

DT = torch.float64


def rotated(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q``."""
    g = torch.Generator().manual_seed(seed)
    n = eigenvalues.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return (Q * eigenvalues.to(DT)) @ Q.T


def spectrum(n: int = 300, seed: int = 0) -> torch.Tensor:
    """Outliers on both sides, a bulk, and a block of zeros (a Hessian-like spectrum)."""
    g = torch.Generator().manual_seed(seed)
    top = torch.tensor([50.0, 40.0, 31.0, 25.0, 20.0, 16.0, 13.0, 11.0, 9.5, 8.5])
    neg = torch.tensor([-12.0, -9.0, -7.0])
    bulk = torch.rand(n - 100 - 13, generator=g) * 2 - 0.5
    return torch.cat([top, neg, bulk, torch.zeros(100)]).to(DT)


def test_lanczos_is_an_orthogonal_tridiagonalisation():
    A = rotated(spectrum(120))
    alphas, betas, Q = lanczos(A, 40)
    assert alphas.shape == (40,) and betas.shape == (39,) and Q.shape == (120, 40)
    torch.testing.assert_close(Q.T @ Q, torch.eye(40, dtype=DT), atol=1e-12, rtol=0)
    T = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
    torch.testing.assert_close(Q.T @ A @ Q, T, atol=1e-10, rtol=0)


def test_lanczos_restarts_after_an_invariant_subspace():
    # Rank 3 with distinct eigenvalues: a random start spans an invariant subspace of
    # dimension 4 (3 eigenvectors + a null direction), then Lanczos must restart.
    A = rotated(torch.cat([torch.tensor([3.0, 2.0, 1.0]), torch.zeros(27)]).to(DT), seed=1)
    alphas, betas, Q = lanczos(A, 10)
    assert Q.shape == (30, 10)
    assert (betas == 0).any()
    torch.testing.assert_close(Q.T @ Q, torch.eye(10, dtype=DT), atol=1e-12, rtol=0)
    T = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
    torch.testing.assert_close(Q.T @ A @ Q, T, atol=1e-10, rtol=0)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("backend", ["torch", "scipy"])
def test_top_eigenpairs_match_eigh(which, backend):
    ev = spectrum(300)
    A = rotated(ev)
    k = 3 if which == "SA" else 6
    res = top_eigenpairs(A, k, which=which, backend=backend, seed=3)
    ref, ref_vecs = torch.linalg.eigh(A)
    order = {
        "LA": torch.argsort(ref, descending=True),
        "SA": torch.argsort(ref),
        "LM": torch.argsort(ref.abs(), descending=True),
    }[which][:k]
    torch.testing.assert_close(res.eigenvalues, ref[order], rtol=1e-9, atol=1e-9)
    assert bool(res.converged.all())
    # Residuals are recomputed independently here.
    V = res.eigenvectors
    own = (A @ V - V * res.eigenvalues).norm(dim=0)
    assert float(own.max()) < 1e-6
    torch.testing.assert_close(res.residuals, own, rtol=1e-6, atol=1e-10)
    # Eigenvectors match up to sign.
    overlap = (V.T @ ref_vecs[:, order]).abs().diagonal()
    torch.testing.assert_close(overlap, torch.ones(k, dtype=DT), atol=1e-8, rtol=0)


def test_top_eigenpairs_float32_operator_and_validation():
    A = rotated(spectrum(200)).float()
    res = top_eigenpairs(A, 3)
    assert res.eigenvectors.dtype == torch.float32
    torch.testing.assert_close(res.eigenvalues, torch.tensor([50.0, 40.0, 31.0], dtype=DT),
                               rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="k must be between"):
        top_eigenpairs(A, 0)
    with pytest.raises(ValueError, match="which must be"):
        top_eigenpairs(A, 2, which="BE")  # type: ignore[arg-type]


def test_slq_density_integrates_to_one_and_has_the_right_mean():
    ev = spectrum(400, seed=2)
    A = rotated(ev, seed=2)
    grid, density, res = slq_density(A, num_probes=20, num_iter=40, seed=0)
    torch.testing.assert_close(res.weights.sum(dim=1), torch.ones(20, dtype=DT), atol=1e-10,
                               rtol=0)
    assert abs(float(torch.trapezoid(density, grid)) - 1.0) < 1e-6
    mean = float(torch.trapezoid(grid * density, grid))
    # Monte Carlo error of a Rademacher trace estimate: sqrt(2 sum_{i!=j} A_ij^2 / P) / n.
    off = A - torch.diag(torch.diagonal(A))
    se = math.sqrt(2 * float((off**2).sum()) / 20) / 400
    assert abs(mean - float(ev.mean())) < 4 * se
    # The Gauss rule integrates t exactly: per probe it is z^T A z / n.
    torch.testing.assert_close(mean, float(res.trace_estimates(lambda t: t).mean()) / 400,
                               rtol=1e-6, atol=1e-8)


def test_slq_blocked_equals_sequential_and_is_seeded():
    A = rotated(spectrum(200))
    rng_before = torch.random.get_rng_state()
    seq = slq(A, num_probes=5, num_iter=30, seed=7, block_size=1)
    blk = slq(A, num_probes=5, num_iter=30, seed=7, block_size=2)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    torch.testing.assert_close(blk.nodes, seq.nodes, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(blk.weights, seq.weights, rtol=1e-7, atol=1e-9)
    again = slq(A, num_probes=5, num_iter=30, seed=7, block_size=1)
    assert torch.equal(again.nodes, seq.nodes)
    other = slq(A, num_probes=5, num_iter=30, seed=8)
    assert not torch.equal(other.nodes, seq.nodes)


def test_slq_count_above_a_spectral_gap():
    # 40 eigenvalues in [5, 10], the rest in [-0.1, 0.1]: a threshold in the gap is resolved
    # by the quadrature, leaving only the Monte Carlo error.
    g = torch.Generator().manual_seed(0)
    ev = torch.cat([5 + 5 * torch.rand(40, generator=g), 0.2 * torch.rand(460, generator=g) - 0.1])
    A = rotated(ev.to(DT), seed=4)
    c = slq_count_above(A, threshold=1.0, num_probes=30, num_iter=30)
    assert c.per_probe.shape == (30,)
    assert abs(c.estimate - 40) < max(4 * c.standard_error, 1.0)
    assert 0 < c.standard_error < 5
    with pytest.raises(ValueError, match="threshold"):
        slq_count_above(A, threshold=-1.0)


def test_deflated_count_via_projection():
    # Deflating the exact top eigenvectors leaves tr(P 1[|PAP| > t] P) = (count - deflated).
    ev = spectrum(300)
    A = rotated(ev)
    evals, evecs = torch.linalg.eigh(A)
    V = evecs[:, -5:]  # the 5 largest

    res = slq(ProjectedOperator(MatrixOperator(A), V), num_probes=20, num_iter=60)
    c = count_from_slq(res, threshold=5.0)
    true_rest = int((ev.abs() > 5.0).sum()) - 5
    assert abs(c.estimate - true_rest) < max(4 * c.standard_error, 1.0)
    # Probe weights are ||P z||^2 / n, so the total mass is (n - 5) / n on average.
    assert abs(float(res.weights.sum(dim=1).mean()) - 295 / 300) < 0.02
    # Truncating to fewer steps reuses the tridiagonals without new products.
    half = res.truncated(30)
    assert half.nodes.shape == (20, 30) and half.num_matvecs == 0


def test_linear_operators_agree_with_the_dense_matrix():
    A = rotated(torch.linspace(-1, 3, 50, dtype=DT))
    x, X = torch.randn(50, dtype=DT), torch.randn(50, 4, dtype=DT)
    for op in (MatrixOperator(A), CallableOperator(lambda v: A @ v, 50, DT)):
        assert op.shape == (50, 50) and op.dtype == DT
        torch.testing.assert_close(op @ x, A @ x)
        torch.testing.assert_close(op @ X, A @ X)
        assert op.num_matvecs == 5
        sp = op.to_scipy()
        torch.testing.assert_close(torch.from_numpy(sp @ x.numpy()), A @ x)
        torch.testing.assert_close(torch.from_numpy(sp @ X.numpy()), A @ X)
        with pytest.raises(ValueError, match="multiplies a vector"):
            op @ torch.ones(49, dtype=DT)
    # Deflation: P A P with P = I - V V^T, against the explicit matrix.
    V, _ = torch.linalg.qr(torch.randn(50, 3, dtype=DT))
    P = torch.eye(50, dtype=DT) - V @ V.T
    torch.testing.assert_close(ProjectedOperator(MatrixOperator(A), V) @ X, P @ A @ P @ X)


def test_unconverged_eigenpairs_warn_and_are_flagged():
    A = rotated(spectrum(300))
    with pytest.warns(UserWarning, match="did not reach"):
        res = top_eigenpairs(A, 6, which="SA", max_iter=8)
    assert not bool(res.converged.all())


def test_sa_eigenpairs_converge_at_the_default_depth_on_a_hessian():
    # The case: which="SA" on a network Hessian (k=20) converged only partly.
    import torch.nn.functional as F
    from torch import nn

    from lightning_plasticity.measures import HessianVectorProduct

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 40), nn.Tanh(), nn.Linear(40, 5)).double()
    x, y = torch.randn(128, 20, dtype=DT), torch.randint(0, 5, (128,))
    hvp = HessianVectorProduct(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))
    res = top_eigenpairs(hvp, 20, which="SA")
    assert bool(res.converged.all())
    exact = torch.linalg.eigvalsh(hvp.dense())[:20]
    torch.testing.assert_close(res.eigenvalues, exact, rtol=1e-6, atol=1e-9)


def test_radau_brackets_contain_each_probes_exact_count():
    # The Gauss-Radau bracket is a guarantee (Chebyshev-Markov-Stieltjes-Krein): each probe's
    # exact z^T 1[|A| > t] z lies within half_width of its estimate, at any depth.
    from lightning_plasticity.measures.lanczos import _generator, _rademacher, radau_count

    ev = spectrum(300, seed=5)
    A = rotated(ev, seed=5)
    evals, evecs = torch.linalg.eigh(A)
    for t, num_iter in ((5.0, 40), (0.3, 25), (0.3, 60)):
        res = slq(A, num_probes=6, num_iter=num_iter, seed=2, reorthogonalize=True)
        counts, half = radau_count(res, t)
        g = _generator(2)
        probes = [_rademacher(300, g, "cpu") for _ in range(6)]
        projector = (evecs * (evals.abs() > t).to(DT)) @ evecs.T
        exact = torch.stack([z @ projector @ z for z in probes])
        assert bool(((counts - exact).abs() <= half + 1e-6).all()), (t, num_iter)
        assert float(half.mean()) < 0.5 * 300
