import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_plasticity.measures.hvp import HessianVectorProduct
from lightning_plasticity.measures.parameter_selection import select_parameters
from tests.measures.references import reference_hessian

DT = torch.float64


# ----------------------------------------------------------------------------- helpers
class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(torch.tanh(out).mean(dim=1))


def make_case(kind: str):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(10, 4, generator=g)
    elif kind == "cnn":
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
        )
        x = torch.randn(6, 2, 6, 6, generator=g)
    elif kind == "layernorm":
        model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(10, 4, generator=g)
    elif kind == "batchnorm":
        model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
        bn = model[1]
        bn.running_mean.copy_(torch.randn(6, generator=g))
        bn.running_var.copy_(torch.rand(6, generator=g) + 0.5)
        model.eval()
        x = torch.randn(10, 4, generator=g)
    elif kind == "attention":
        model = Attention()
        x = torch.randn(5, 3, 4, generator=g)
    else:
        raise AssertionError(kind)
    model = model.to(DT)
    y = torch.randint(0, 3, (x.shape[0],), generator=g)
    return model, (x.to(DT), y)


def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def snapshot(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in
                  model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "rng": torch.random.get_rng_state(),
    }


def assert_unchanged(model, snap):
    after = snapshot(model)
    for n, p in snap["params"].items():
        assert torch.equal(p, after["params"][n]), n
    for n, gr in snap["grads"].items():
        other = after["grads"][n]
        assert (gr is None) == (other is None) and (gr is None or torch.equal(gr, other)), n
    assert snap["requires_grad"] == after["requires_grad"]
    assert snap["training"] == after["training"]
    for n, b in snap["buffers"].items():
        assert torch.equal(b, after["buffers"][n]), n
    assert torch.equal(snap["rng"], after["rng"])


KINDS = ["mlp", "cnn", "layernorm", "batchnorm", "attention"]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", KINDS)
def test_hvp_gradient_dense_match_torch_func(kind):
    model, batch = make_case(kind)
    method = "fd" if kind == "layernorm" else "func"
    tol = {"rtol": 1e-6, "atol": 1e-8} if method == "fd" else {"rtol": 1e-9, "atol": 1e-11}
    H_ref, g_ref = reference_hessian(model, ce_loss, batch, method=method)
    snap = snapshot(model)
    with HessianVectorProduct(model, ce_loss, batch) as hvp:
        n = hvp.num_params
        assert n == H_ref.shape[0]
        assert hvp.dtype == DT
        torch.testing.assert_close(hvp.loss, ce_loss(model, batch).detach())
        torch.testing.assert_close(hvp.gradient, g_ref, rtol=1e-10, atol=1e-12)
        gen = torch.Generator().manual_seed(1)
        V = torch.randn(n, 4, generator=gen, dtype=DT)
        for j in range(4):
            torch.testing.assert_close(hvp.matvec(V[:, j]), H_ref @ V[:, j], **tol)
        torch.testing.assert_close(hvp.matmat(V), H_ref @ V, **tol)
        H = hvp.dense()
        torch.testing.assert_close(H, (H_ref + H_ref.T) / 2, **tol)
        assert torch.equal(H, H.T)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_batched_and_looped_products_agree(kind):
    model, batch = make_case(kind)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 5, dtype=DT)
    looped = HessianVectorProduct(model, ce_loss, batch, batched=False).matmat(V)
    fast = HessianVectorProduct(model, ce_loss, batch, max_batch=3)
    torch.testing.assert_close(fast.matmat(V), looped, rtol=1e-10, atol=1e-12)


def test_matvec_is_linear_and_accepts_other_dtypes():
    model, batch = make_case("mlp")
    hvp = HessianVectorProduct(model, ce_loss, batch)
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(hvp.num_params, generator=gen, dtype=DT)
    v = torch.randn(hvp.num_params, generator=gen, dtype=DT)
    torch.testing.assert_close(
        hvp.matvec(2.5 * u - 0.5 * v), 2.5 * hvp.matvec(u) - 0.5 * hvp.matvec(v),
        rtol=1e-10, atol=1e-12,
    )
    assert hvp.matvec(u.float()).dtype == DT
    with pytest.raises(ValueError, match="length num_params"):
        hvp.matvec(u[:-1])


def test_parameter_block_is_the_sub_block_of_the_full_hessian():
    model, batch = make_case("layernorm")
    block = select_parameters(model, last_n_layers=2)
    names = [n for n, _ in block]
    H_ref, _ = reference_hessian(model, ce_loss, batch, names, method="fd")
    hvp = HessianVectorProduct(model, ce_loss, batch, params=block)
    assert hvp.names == names
    torch.testing.assert_close(hvp.dense(), (H_ref + H_ref.T) / 2, rtol=1e-6, atol=1e-8)
    # Bare parameters are accepted too.
    bare = HessianVectorProduct(model, ce_loss, batch, params=[p for _, p in block])
    assert bare.names == names


def test_reduce_hook_is_applied_everywhere():
    model, batch = make_case("mlp")
    calls = []

    def reduce(t):
        calls.append(tuple(t.shape))
        return 2 * t

    plain = HessianVectorProduct(model, ce_loss, batch)
    red = HessianVectorProduct(model, ce_loss, batch, reduce=reduce)
    v = torch.randn(plain.num_params, dtype=DT)
    torch.testing.assert_close(red.loss, 2 * plain.loss)
    torch.testing.assert_close(red.gradient, 2 * plain.gradient)
    torch.testing.assert_close(red.matvec(v), 2 * plain.matvec(v))
    V = torch.randn(plain.num_params, 3, dtype=DT)
    torch.testing.assert_close(red.matmat(V), 2 * plain.matmat(V))
    torch.testing.assert_close(red.dense(), 2 * plain.dense())
    n = plain.num_params
    # loss, gradient, matvec, matmat (one call per block), dense (one call for the matrix)
    assert calls == [(), (n,), (n,), (n, 3), (n, n)]


def test_linearly_used_parameter_has_zero_hessian_rows():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.shift = nn.Parameter(torch.ones(2))  # enters the loss linearly only

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.lin(x) ** 2).mean() + (self.shift * 3.0).sum()

    net = Net().to(DT)
    x = torch.randn(7, 3, dtype=DT)

    def loss_fn(m, b):
        return m(b)

    hvp = HessianVectorProduct(net, loss_fn, x)
    H = hvp.dense()
    H_ref, _ = reference_hessian(net, loss_fn, x)
    torch.testing.assert_close(H, H_ref, rtol=1e-10, atol=1e-12)
    assert hvp.names[0] == "shift"  # a module's own parameters come before its children's
    assert torch.count_nonzero(H[:2]) == 0
    torch.testing.assert_close(hvp.gradient[:2], torch.full((2,), 3.0, dtype=DT))


def test_non_finite_loss_raises():
    model, (x, y) = make_case("mlp")
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"NaN/inf.*on the probe batch"):
        HessianVectorProduct(model, ce_loss, (x, y))


def test_loss_independent_of_parameters_raises():
    model, batch = make_case("mlp")
    with pytest.raises(ValueError, match="does not depend"):
        HessianVectorProduct(model, lambda m, b: torch.tensor(1.0, dtype=DT), batch)
    with pytest.raises(ValueError, match="does not depend on any of the selected"):
        HessianVectorProduct(
            model, lambda m, b: m[0](b[0]).sum(), batch, params=select_parameters(
                model, modules=["2"]
            ),
        )
    with pytest.raises(ValueError, match="scalar"):
        HessianVectorProduct(model, lambda m, b: m(b[0]), batch)


def test_frozen_param_and_empty_selection_raise():
    model, batch = make_case("mlp")
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        HessianVectorProduct(model, ce_loss, batch, params=[model[0].weight])
    with pytest.raises(ValueError, match="empty"):
        HessianVectorProduct(model, ce_loss, batch, params=[])


def test_dense_limits_and_release():
    model, batch = make_case("mlp")
    hvp = HessianVectorProduct(model, ce_loss, batch)
    n = hvp.num_params
    with pytest.raises(ValueError, match=rf"{n} parameters exceeds max_params=10.*lanczos"):
        hvp.dense(max_params=10)
    with pytest.raises(ValueError, match="max_memory_bytes"):
        hvp.dense(max_memory_bytes=100)
    hvp.release()
    with pytest.raises(RuntimeError, match="released"):
        hvp.matvec(torch.zeros(n, dtype=DT))


def test_train_mode_side_effects_are_undone():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.3), nn.Tanh(), nn.Linear(6, 3)
    ).to(DT)
    model.train()
    x = torch.randn(10, 4, dtype=DT)
    y = torch.randint(0, 3, (10,))
    loss = ce_loss(model, (x, y))
    loss.backward()  # populated .grad fields must survive
    snap = snapshot(model)
    hvp = HessianVectorProduct(model, ce_loss, (x, y))
    v = torch.randn(hvp.num_params, dtype=DT, generator=torch.Generator().manual_seed(0))
    hv1 = hvp.matvec(v)
    # The dropout mask is fixed once: products are deterministic.
    torch.testing.assert_close(hvp.matvec(v), hv1, rtol=0, atol=0)
    hvp.dense()
    hvp.release()
    assert_unchanged(model, snap)
    assert model[1].num_batches_tracked.item() == 1
