import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian

from lightning_plasticity.measures.hessian_spectrum import (
    effective_rank,
    eps_rank_of_matrix,
    hessian_eigenvalues,
    hessian_eps_rank,
    spectral_density,
)
from lightning_plasticity.measures.parameter_selection import select_parameters
from tests.measures.references import reference_hessian

DT = torch.float64


# ----------------------------------------------------------------------------- helpers
class Quadratic(nn.Module):
    """``loss = 0.5 theta^T A theta + b^T theta``: the Hessian is exactly ``A``."""

    def __init__(self, eigenvalues: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = eigenvalues.numel()
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
        self.register_buffer("A", (Q * eigenvalues.to(DT)) @ Q.T)
        self.register_buffer("b", torch.randn(n, generator=g, dtype=DT))
        self.theta = nn.Parameter(torch.randn(n, generator=g, dtype=DT))

    def forward(self, _batch: object = None) -> torch.Tensor:
        return 0.5 * self.theta @ self.A @ self.theta + self.b @ self.theta


def quad_loss(model, batch):
    return model(batch)


def mlp_case(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (12,), generator=g)
    return model, (x, y)


def ce_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def snapshot(model):
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
        torch.random.get_rng_state(),
    )


def assert_unchanged(model, snap):
    params, grads, flags, modes, rng = snap
    for p, old in zip(model.parameters(), params):
        assert torch.equal(p.detach(), old)
    for p, old in zip(model.parameters(), grads):
        assert (p.grad is None and old is None) or torch.equal(p.grad, old)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.random.get_rng_state(), rng)


# Distinct eigenvalues away from the thresholds used below (absolute 0.8, relative 1e-2 * 30).
QUAD_EIGS = torch.tensor(
    [-3.0, -0.7, -0.2, -0.01, 0.0, 1e-4, 0.02, 0.35, 0.9, 1.7, 4.0, 12.0, 30.0] + [0.0] * 7,
    dtype=DT,
)


# ----------------------------------------------------------------------------- eps-rank
@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_eps_rank_exact_on_quadratic(method):
    model = Quadratic(QUAD_EIGS)
    snap = snapshot(model)
    r = hessian_eps_rank(model, quad_loss, None, eps=0.8, relative=False, method=method)
    assert r.method == method
    assert r.eps_rank == 6  # -3, 0.9, 1.7, 4, 12, 30
    assert r.threshold == 0.8
    assert r.num_params == 20
    assert r.normalized_rank == pytest.approx(6 / 20)
    assert r.top_eigenvalue == pytest.approx(30.0, rel=1e-10)
    assert r.error_estimate == 0.0
    # Relative: threshold 1e-2 * 30 = 0.3 -> -3, -0.7, 0.35, 0.9, 1.7, 4, 12, 30.
    rel = hessian_eps_rank(model, quad_loss, None, eps=1e-2, method=method)
    assert rel.threshold == pytest.approx(0.3)
    assert rel.eps_rank == 8
    expected_erank = effective_rank(QUAD_EIGS)
    assert rel.effective_rank == pytest.approx(expected_erank, rel=1e-8)
    if method == "dense":
        torch.testing.assert_close(
            rel.eigenvalues, QUAD_EIGS[torch.argsort(QUAD_EIGS.abs(), descending=True)],
            rtol=0, atol=1e-10,
        )
    assert_unchanged(model, snap)


def test_eps_rank_threshold_count_sanity():
    # The counts asserted above, recomputed from the definition.
    assert int((QUAD_EIGS.abs() > 0.8).sum()) == 6
    assert int((QUAD_EIGS.abs() > 0.3).sum()) == 8


def test_effective_rank_definition():
    assert effective_rank(torch.tensor([1.0, 1.0, 0.0, 0.0])) == pytest.approx(2.0)
    assert effective_rank(torch.tensor([2.0, -2.0, 2.0])) == pytest.approx(3.0)
    p = torch.tensor([3.0, 1.0]) / 4
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(
        math.exp(-(p * p.log()).sum().item())
    )
    assert effective_rank(torch.zeros(3)) == 0.0


def test_lanczos_eps_rank_with_a_spectral_gap_uses_slq():
    # 30 outliers, 300 eigenvalues in [0.5, 2] and a near-null rest: n = 1500 is larger than the
    # Krylov space, so the middle cluster is counted by SLQ on the deflated operator.
    g = torch.Generator().manual_seed(0)
    eigs = torch.cat([
        10 + 90 * torch.rand(30, generator=g),
        0.5 + 1.5 * torch.rand(300, generator=g),
        1e-4 * torch.randn(1170, generator=g),
    ]).to(DT)
    model = Quadratic(eigs, seed=1)
    r = hessian_eps_rank(model, quad_loss, None, eps=0.1, relative=False, method="lanczos",
                         num_lanczos_iter=80, num_probes=30, num_slq_iter=30)
    assert r.method == "lanczos"
    assert 30 <= r.eigenvalues.numel() < 1500
    # Rademacher noise of a rank-300 count: sqrt(2 * 300 * (1 - 300/1500) / 30) ~ 4 per probe
    # average, so 5% (16.5) is 4 standard errors.
    assert abs(r.eps_rank - 330) <= 0.05 * 330
    assert 0 < r.error_estimate < 30
    assert r.top_eigenvalue == pytest.approx(float(eigs.max()), rel=1e-8)
    # SLQ effective rank against the exact one.
    assert r.effective_rank == pytest.approx(effective_rank(eigs), rel=0.05)


def test_dense_eps_rank_matches_torch_func_on_mlp():
    model, batch = mlp_case()
    H = reference_hessian(model, ce_loss, batch)[0]
    ev = torch.linalg.eigvalsh((H + H.T) / 2)
    top = float(ev.abs().max())
    r = hessian_eps_rank(model, ce_loss, batch, eps=1e-3, method="dense")
    assert r.eps_rank == int((ev.abs() > 1e-3 * top).sum())
    assert r.top_eigenvalue == pytest.approx(float(ev[ev.abs().argmax()]), rel=1e-9)
    torch.testing.assert_close(torch.sort(r.eigenvalues).values, ev, rtol=1e-8, atol=1e-12)
    # A parameter block is the sub-Hessian.
    block = select_parameters(model, last_n_layers=1)
    rb = hessian_eps_rank(model, ce_loss, batch, eps=1e-3, method="dense", params=block)
    Hb = H[-27:, -27:]
    evb = torch.linalg.eigvalsh((Hb + Hb.T) / 2)
    assert rb.num_params == 27
    assert rb.eps_rank == int((evb.abs() > 1e-3 * evb.abs().max()).sum())


def test_reduce_passes_through():
    model, batch = mlp_case()
    base = hessian_eps_rank(model, ce_loss, batch, method="dense")
    doubled = hessian_eps_rank(model, ce_loss, batch, method="dense", reduce=lambda t: 2 * t)
    assert doubled.top_eigenvalue == pytest.approx(2 * base.top_eigenvalue, rel=1e-10)
    assert doubled.eps_rank == base.eps_rank
    assert doubled.loss == pytest.approx(2 * base.loss)


def test_dense_limits_and_auto():
    model, batch = mlp_case()
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=rf"{n} parameters exceeds max_params=10.*lanczos"):
        hessian_eps_rank(model, ce_loss, batch, method="dense", max_dense_params=10)
    with pytest.raises(ValueError, match="GiB.*lanczos"):
        hessian_eps_rank(model, ce_loss, batch, method="dense", max_dense_memory_bytes=1000)
    auto_small = hessian_eps_rank(model, ce_loss, batch, method="auto")
    assert auto_small.method == "dense"
    auto_big = hessian_eps_rank(model, ce_loss, batch, method="auto", max_dense_params=10,
                                num_lanczos_iter=20, num_probes=2, num_slq_iter=10)
    assert auto_big.method == "lanczos"


def test_bad_arguments():
    model, batch = mlp_case()
    with pytest.raises(ValueError, match="eps must be"):
        hessian_eps_rank(model, ce_loss, batch, eps=0.0)
    with pytest.raises(ValueError, match="method must be"):
        hessian_eps_rank(model, ce_loss, batch, method="exact")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_probes must be"):
        hessian_eps_rank(model, ce_loss, batch, method="lanczos", num_probes=0)


# ----------------------------------------------------------------------------- 10k MLP
class GroupedMLP(nn.Module):
    """``K`` independent tanh MLPs evaluated with batched matmuls; the loss is the mean of
    their cross-entropies, so the Hessian is block diagonal with one block per member and its
    exact spectrum is the union of the members' spectra (cheap to compute by torch.func)."""

    def __init__(self, k: int, d: int, h: int, c: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(k, d, h, generator=g, dtype=DT) / math.sqrt(d))
        self.b1 = nn.Parameter(0.1 * torch.randn(k, 1, h, generator=g, dtype=DT))
        self.w2 = nn.Parameter(torch.randn(k, h, c, generator=g, dtype=DT) / math.sqrt(h))
        self.b2 = nn.Parameter(0.1 * torch.randn(k, 1, c, generator=g, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (k, batch, d)
        return torch.baddbmm(self.b2, torch.tanh(torch.baddbmm(self.b1, x, self.w1)), self.w2)


def grouped_loss(model, batch):
    x, y = batch
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def test_lanczos_eps_rank_close_to_exact_on_10k_parameter_mlp():
    k, d, h, c, b = 42, 10, 16, 4, 16
    model = GroupedMLP(k, d, h, c)
    g = torch.Generator().manual_seed(1)
    # Members see inputs of different scales, so their curvatures span decades as the layers
    # of a real network do (a few outliers, a bulk, a near-null part).
    scales = torch.logspace(-1, math.log10(3.0), k, dtype=DT).view(k, 1, 1)
    x = scales * torch.randn(k, b, d, generator=g, dtype=DT)
    y = torch.randint(0, c, (k, b), generator=g)
    n = sum(p.numel() for p in model.parameters())
    assert n >= 10_000

    # Exact spectrum: one small torch.func Hessian per member (each scaled by 1/k).
    def member_loss(flat, xm, ym):
        w1, b1, w2, b2 = flat.split([d * h, h, h * c, c])
        hid = torch.tanh(xm @ w1.view(d, h) + b1)
        return F.cross_entropy(hid @ w2.view(h, c) + b2, ym) / k

    eigs = []
    for m in range(k):
        flat = torch.cat([model.w1[m].reshape(-1), model.b1[m].reshape(-1),
                          model.w2[m].reshape(-1), model.b2[m].reshape(-1)]).detach()
        Hm = hessian(member_loss)(flat, x[m], y[m])
        eigs.append(torch.linalg.eigvalsh((Hm + Hm.T) / 2))
    ev = torch.cat(eigs)
    top = float(ev.abs().max())
    exact = int((ev.abs() > 1e-3 * top).sum())

    snap = snapshot(model)
    r = hessian_eps_rank(model, grouped_loss, (x, y), method="lanczos")
    assert_unchanged(model, snap)
    assert r.top_eigenvalue == pytest.approx(float(ev[ev.abs().argmax()]), rel=1e-8)
    # The documented accuracy: within 5% of the dense count with the default settings.
    rel_err = abs(r.eps_rank - exact) / exact
    assert rel_err < 0.05, (r.eps_rank, exact, r.error_estimate)
    assert r.error_estimate > 0


# ----------------------------------------------------------------------------- eigenpairs
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_hessian_eigenvalues_on_quadratic(which):
    model = Quadratic(QUAD_EIGS)
    snap = snapshot(model)
    res = hessian_eigenvalues(model, quad_loss, None, k=3, which=which)
    expected = {
        "LA": [30.0, 12.0, 4.0],
        "SA": [-3.0, -0.7, -0.2],
        "LM": [30.0, 12.0, 4.0],
    }[which]
    torch.testing.assert_close(res.eigenvalues, torch.tensor(expected, dtype=DT), rtol=0,
                               atol=1e-9)
    V = res.eigenvectors
    torch.testing.assert_close(model.A @ V, V * res.eigenvalues, rtol=0, atol=1e-8)
    assert bool(res.converged.all()) and float(res.residuals.max()) < 1e-7
    assert_unchanged(model, snap)


def test_hessian_eigenvalues_on_mlp_match_dense():
    model, batch = mlp_case(1)
    H = reference_hessian(model, ce_loss, batch)[0]
    ev = torch.linalg.eigvalsh((H + H.T) / 2)
    top = hessian_eigenvalues(model, ce_loss, batch, k=4)
    torch.testing.assert_close(top.eigenvalues, ev.flip(0)[:4], rtol=1e-8, atol=1e-10)
    neg = hessian_eigenvalues(model, ce_loss, batch, k=2, which="SA")
    torch.testing.assert_close(neg.eigenvalues, ev[:2], rtol=1e-8, atol=1e-10)
    assert neg.eigenvalues[0] < 0


# ----------------------------------------------------------------------------- density
def test_spectral_density_integrates_to_one():
    model, batch = mlp_case(2)
    H = reference_hessian(model, ce_loss, batch)[0]
    snap = snapshot(model)
    d = spectral_density(model, ce_loss, batch, num_probes=30, num_iter=20, grid=2000)
    assert_unchanged(model, snap)
    assert abs(float(torch.trapezoid(d.density, d.grid)) - 1) < 1e-6
    mean = float(torch.trapezoid(d.grid * d.density, d.grid))
    n = H.shape[0]
    off = H - torch.diag(torch.diagonal(H))
    se = math.sqrt(2 * float((off**2).sum()) / 30) / n
    assert abs(mean - float(torch.trace(H)) / n) < 4 * se
    assert d.num_params == n and d.nodes.shape == (30, 20)


def test_eps_rank_of_matrix_on_a_known_spectrum() -> None:
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.tensor([-8.0, 5.0, 2.0]), torch.full((37,), 1e-3)]).double()
    H = Q @ torch.diag(lam) @ Q.T
    r = eps_rank_of_matrix(H, eps=0.1)  # threshold 0.8
    assert (r.eps_rank, r.num_params, r.method, r.error_estimate) == (3.0, 40, "dense", 0.0)
    assert r.top_eigenvalue == pytest.approx(-8.0, rel=1e-12)
    assert r.threshold == pytest.approx(0.8, rel=1e-12)
    assert eps_rank_of_matrix(H.float(), eps=1e-4, relative=False).eps_rank == 40.0
    p = lam.abs() / lam.abs().sum()
    assert r.effective_rank == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-10)
    with pytest.raises(ValueError, match="square"):
        eps_rank_of_matrix(torch.zeros(3, 2))
