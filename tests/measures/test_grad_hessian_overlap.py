import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_plasticity.measures.grad_hessian_overlap import (
    gradient_hessian_alignment,
    gradient_hessian_overlap,
    gradient_topk_fraction,
)
from lightning_plasticity.measures.parameter_selection import select_parameters
from tests.measures.references import reference_hessian

DT = torch.float64


def mlp_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (16,), generator=g)
    return model, (x, y)


def ce_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def reference(model, batch, names=None):
    H, g = reference_hessian(model, ce_loss, batch, names)
    return (H + H.T) / 2, g


def state(model):
    return (
        [p.detach().clone() for p in model.parameters()],
        [p.grad for p in model.parameters()],
        [m.training for m in model.modules()],
        torch.random.get_rng_state(),
    )


def assert_unchanged(model, before):
    params, grads, modes, rng = before
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), params))
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_overlap_matches_direct_formula():
    model, batch = mlp_case()
    H, g = reference(model, batch)
    before = state(model)
    o = gradient_hessian_overlap(model, ce_loss, batch)
    assert_unchanged(model, before)
    hg = H @ g
    assert o.overlap == pytest.approx(float(g @ hg / (g.norm() * hg.norm())), rel=1e-10)
    assert o.rayleigh_quotient == pytest.approx(float(g @ hg / (g @ g)), rel=1e-10)
    assert o.gradient_norm == pytest.approx(float(g.norm()), rel=1e-12)
    assert o.hessian_gradient_norm == pytest.approx(float(hg.norm()), rel=1e-10)
    assert -1 <= o.overlap <= 1


@pytest.mark.parametrize("which", ["LA", "LM"])
def test_topk_fraction_matches_direct_projection(which):
    model, batch = mlp_case()
    H, g = reference(model, batch)
    evals, evecs = torch.linalg.eigh(H)
    order = (torch.argsort(evals, descending=True) if which == "LA"
             else torch.argsort(evals.abs(), descending=True))[:4]
    proj = evecs[:, order].T @ g
    expected_sq = float(proj @ proj / (g @ g))
    before = state(model)
    f = gradient_topk_fraction(model, ce_loss, batch, k=4, which=which)
    assert_unchanged(model, before)
    assert f.k == 4 and f.all_converged
    torch.testing.assert_close(f.eigenvalues, evals[order], rtol=1e-9, atol=1e-12)
    assert f.fraction_squared == pytest.approx(expected_sq, rel=1e-8)
    assert f.fraction == pytest.approx(math.sqrt(expected_sq), rel=1e-8)


def test_alignment_reuses_one_engine_and_agrees():
    model, batch = mlp_case()
    block = select_parameters(model, last_n_layers=1)
    a = gradient_hessian_alignment(model, ce_loss, batch, k=3, params=block)
    o = gradient_hessian_overlap(model, ce_loss, batch, params=block)
    f = gradient_topk_fraction(model, ce_loss, batch, k=3, params=block)
    assert a.overlap == o
    assert a.topk.fraction == pytest.approx(f.fraction, rel=1e-12)
    assert a.loss == pytest.approx(float(ce_loss(model, batch).detach()))
    H, g = reference(model, batch, names=[n for n, _ in block])
    hg = H @ g
    assert a.overlap.overlap == pytest.approx(float(g @ hg / (g.norm() * hg.norm())), rel=1e-10)


def test_reduce_scales_consistently():
    model, batch = mlp_case()
    base = gradient_hessian_alignment(model, ce_loss, batch, k=2)
    doubled = gradient_hessian_alignment(model, ce_loss, batch, k=2, reduce=lambda t: 2 * t)
    # g -> 2g and H -> 2H: the cosine and the fractions are scale free.
    assert doubled.overlap.overlap == pytest.approx(base.overlap.overlap, rel=1e-10)
    assert doubled.overlap.rayleigh_quotient == pytest.approx(
        2 * base.overlap.rayleigh_quotient, rel=1e-10
    )
    assert doubled.topk.fraction == pytest.approx(base.topk.fraction, rel=1e-8)


def test_zero_gradient_gives_nan():
    class Bowl(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.theta = nn.Parameter(torch.zeros(4, dtype=DT))

        def forward(self, _: object) -> torch.Tensor:
            return (torch.arange(1.0, 5.0, dtype=DT) * self.theta**2).sum()

    model = Bowl()
    a = gradient_hessian_alignment(model, lambda m, b: m(b), None, k=2)
    assert a.overlap.gradient_norm == 0.0
    assert math.isnan(a.overlap.overlap) and math.isnan(a.topk.fraction)
    with pytest.raises(ValueError, match="k must be >= 1"):
        gradient_topk_fraction(model, lambda m, b: m(b), None, k=0)
