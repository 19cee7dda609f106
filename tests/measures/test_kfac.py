"""KFAC factors against explicit covariances, exact GGN blocks and Kronecker spectra (float64)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_plasticity.measures.kfac import (
    KFACFactors,
    kfac_eps_rank,
    kfac_factors,
    kfac_spectrum,
)
from lightning_plasticity.measures.spectral_stats import effective_rank

TOL = {"rtol": 1e-10, "atol": 1e-12}


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Sigmoid(), nn.Linear(4, 3))


def cnn() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    )


def batch(n: int, shape: tuple[int, ...], classes: int = 3, seed: int = 2) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


# ------------------------------------------------------------------------------------------
# Independent reference: explicit patches by slicing, per-example backprop of the columns of
# the symmetric square root of the loss Hessian (from autograd.functional.hessian).
# ------------------------------------------------------------------------------------------


def explicit_patches(module: nn.Module, x: Tensor) -> Tensor:
    """(N, P, D) per-position inputs; convolutions by slicing (zero padding, no dilation)."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    (ph, pw), (sh, sw), (kh, kw) = module.padding, module.stride, module.kernel_size
    xp = F.pad(x, (pw, pw, ph, ph))
    out_h = (xp.shape[2] - kh) // sh + 1
    out_w = (xp.shape[3] - kw) // sw + 1
    cols = [
        xp[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw].reshape(x.shape[0], -1)
        for i in range(out_h)
        for j in range(out_w)
    ]
    return torch.stack(cols, dim=1)


def positions(module: nn.Module, y: Tensor) -> Tensor:
    if isinstance(module, nn.Linear):
        return y.reshape(y.shape[0], -1, y.shape[-1])
    return y.flatten(2).transpose(1, 2)


def reference_factors(
    model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, names: list[str]
) -> dict[str, tuple[Tensor, Tensor]]:
    modules = dict(model.named_modules())
    captured: dict[str, tuple[Tensor, Tensor]] = {}
    handles = [
        modules[n].register_forward_hook(lambda m, a, o, n=n: captured.__setitem__(n, (a[0], o)))
        for n in names
    ]
    out = model(x)
    for h in handles:
        h.remove()
    hess = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), out.detach())
    N, C = out.shape
    G = {n: torch.zeros(modules[n].weight.shape[0], modules[n].weight.shape[0]) for n in names}
    for i in range(N):
        evals, evecs = torch.linalg.eigh(hess[i, :, i, :])
        sqrt_h = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T  # symmetric root
        for v in range(C):
            scalar = (out[i] * sqrt_h[:, v]).sum()
            grads = torch.autograd.grad(scalar, [captured[n][1] for n in names], retain_graph=True)
            for n, g in zip(names, grads, strict=True):
                s = positions(modules[n], g).reshape(
                    -1, g.shape[1] if g.dim() == 4 else g.shape[-1]
                )
                G[n] += s.T @ s
    result = {}
    for n in names:
        a = explicit_patches(modules[n], captured[n][0].detach())
        a = a.reshape(-1, a.shape[-1])
        if modules[n].bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1)], dim=1)
        result[n] = (a.T @ a / a.shape[0], G[n])
    return result


def assert_factors_match(factors: dict[str, KFACFactors], ref: dict) -> None:
    assert list(factors) == list(ref)
    for name, (A, G) in ref.items():
        torch.testing.assert_close(factors[name].A, A, **TOL)
        torch.testing.assert_close(factors[name].G, G, **TOL)


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["hooks", "backpack"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_mlp_factors_match_explicit_covariances(backend: str, loss: str) -> None:
    model = mlp()
    x, y = batch(7, (5,))
    loss_fn = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()
    target = y if loss == "ce" else torch.randn(7, 3)
    factors = kfac_factors(model, loss_fn, x, target, backend=backend)
    assert_factors_match(factors, reference_factors(model, loss_fn, x, target, ["0", "2", "4"]))
    assert factors["0"].has_bias and factors["0"].A.shape == (6, 6)
    assert factors["0"].A[-1, -1].item() == pytest.approx(1.0)
    assert factors["0"].num_params == 6 * 6


@pytest.mark.parametrize("backend", ["hooks", "backpack"])
def test_cnn_factors_match_explicit_covariances(backend: str) -> None:
    model = cnn()
    x, y = batch(4, (2, 5, 5))
    factors = kfac_factors(model, nn.CrossEntropyLoss(), x, y, backend=backend)
    ref = reference_factors(model, nn.CrossEntropyLoss(), x, y, ["0", "2", "5"])
    assert_factors_match(factors, ref)
    assert not factors["2"].has_bias and factors["2"].A.shape == (27, 27)


def test_kron_is_the_exact_ggn_block_for_one_example_and_one_position() -> None:
    # With N = 1 and one position, E[g g^T ⊗ a a^T] = E[g g^T] ⊗ E[a a^T]: KFAC is exact, which
    # pins down the [W | b] row-major parameter ordering.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(3, 4))
    x, y = batch(1, (2, 4, 4), classes=4)
    loss_fn = nn.CrossEntropyLoss()
    factors = kfac_factors(model, loss_fn, x, y)
    out = model(x)
    hess = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), out.detach())[0, :, 0, :]
    params = {k: v.detach() for k, v in model.named_parameters()}
    for name in ("0", "3"):
        layer = model.get_submodule(name)

        def f(w: Tensor, b: Tensor, name: str = name) -> Tensor:
            p = {**params, f"{name}.weight": w, f"{name}.bias": b}
            return torch.func.functional_call(model, p, (x,))[0]

        jw, jb = torch.func.jacrev(f, argnums=(0, 1))(layer.weight.detach(), layer.bias.detach())
        J = torch.cat([jw.reshape(4, layer.weight.shape[0], -1), jb[..., None]], dim=-1)
        J = J.reshape(4, -1)
        ggn = J.T @ hess @ J
        torch.testing.assert_close(torch.kron(factors[name].G, factors[name].A), ggn, **TOL)


def test_linear_on_sequences_is_kfac_expand_and_falls_back_from_backpack() -> None:
    # BackPACK's KFLR rejects 3-D Linear inputs; auto silently uses the hooks backend.
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5, 3))
    x, y = batch(5, (3, 4))
    factors = kfac_factors(model, nn.CrossEntropyLoss(), x, y)
    assert_factors_match(factors, reference_factors(model, nn.CrossEntropyLoss(), x, y, ["0", "3"]))


class CustomNet(nn.Module):
    """Not a Sequential, functional ops and an in-place ReLU right after a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc1 = nn.Linear(2 * 4 * 4, 6)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.head(self.act(self.fc1(h)) * 2.0)


def test_custom_module_with_inplace_ops_uses_hooks_and_matches_reference() -> None:
    torch.manual_seed(5)
    model = CustomNet()
    x, y = batch(4, (1, 4, 4))
    factors = kfac_factors(model, nn.CrossEntropyLoss(), x, y)
    # The reference's hook on fc1 sees the output before the in-place ReLU modifies it.
    model.act.inplace = False
    ref = reference_factors(model, nn.CrossEntropyLoss(), x, y, ["conv", "fc1", "head"])
    assert_factors_match(factors, ref)


class NormNet(nn.Module):
    def __init__(self, bn_train: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.ln = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 3)
        self.bn.train(bn_train)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.bn(self.fc2(torch.tanh(self.ln(self.fc1(x)))))))


def snapshot(model: nn.Module) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {
            k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()
        },
        "requires_grad": {k: v.requires_grad for k, v in model.named_parameters()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {
            k: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for k, m in model.named_modules()
        },
        "attrs": {k: sorted(vars(m)) for k, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


def assert_unchanged_and_trainable(model: nn.Module, before: dict, x: Tensor, y: Tensor) -> None:
    after = snapshot(model)
    for key in ("requires_grad", "training", "hooks", "attrs"):
        assert after[key] == before[key], key
    for key in ("params", "grads", "buffers"):
        for k, v in before[key].items():
            assert (v is None and after[key][k] is None) or torch.equal(v, after[key][k]), k
    assert torch.equal(after["rng"], before["rng"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    assert any(not torch.equal(p, before["params"][k]) for k, p in model.named_parameters())


def test_norm_layers_are_skipped_with_one_warning_and_others_match_reference() -> None:
    torch.manual_seed(6)
    model = NormNet(bn_train=False)
    x, y = batch(6, (5,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        factors = kfac_factors(model, nn.CrossEntropyLoss(), x, y)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "ln (LayerNorm)" in messages[0] and "bn (BatchNorm1d)" in messages[0]
    ref = reference_factors(model, nn.CrossEntropyLoss(), x, y, ["fc1", "fc2", "head"])
    assert_factors_match(factors, ref)


def test_backpack_refuses_norm_layers_so_backend_backpack_raises() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    x, y = batch(3, (5,))
    with pytest.raises(ValueError, match="BackPACK supports"):
        kfac_factors(model, nn.CrossEntropyLoss(), x, y, backend="backpack")
    with pytest.warns(UserWarning, match=r"1 \(LayerNorm\)"):
        factors = kfac_factors(model, nn.CrossEntropyLoss(), x, y)  # auto: hooks
    assert list(factors) == ["0", "2"]


@pytest.mark.parametrize("backend", ["hooks", "backpack"])
def test_model_is_unchanged_and_still_trains(backend: str) -> None:
    if backend == "hooks":
        model = NormNet(bn_train=True)
        model.train()
        model.fc1.weight.grad = torch.ones_like(model.fc1.weight)  # pre-existing gradient
    else:
        model = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.3), nn.ReLU(), nn.Linear(6, 3))
        model.train()
    x, y = batch(6, (5,))
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in ("exact", "mc"):
            factors = kfac_factors(model, nn.CrossEntropyLoss(), x, y, mode=mode, backend=backend)
            assert factors
    assert_unchanged_and_trainable(model, before, x, y)


@pytest.mark.parametrize("backend", ["hooks", "backpack"])
def test_inference_mode_and_frozen_first_layer(backend: str) -> None:
    model = mlp()
    model[0].requires_grad_(False)
    x, y = batch(4, (5,))
    with torch.inference_mode():
        factors = kfac_factors(model, nn.CrossEntropyLoss(), x, y, backend=backend)
    assert list(factors) == ["2", "4"]
    ref = reference_factors(model, nn.CrossEntropyLoss(), x, y, ["2", "4"])
    assert_factors_match(factors, ref)


@pytest.mark.parametrize("backend", ["hooks", "backpack"])
def test_mc_mode_is_seeded_and_unbiased(backend: str) -> None:
    model = mlp()
    x, y = batch(4, (5,))
    exact = kfac_factors(model, nn.CrossEntropyLoss(), x, y, backend=backend)
    kwargs = {"mode": "mc", "mc_samples": 1000, "backend": backend}
    mc = kfac_factors(model, nn.CrossEntropyLoss(), x, y, seed=1, **kwargs)
    again = kfac_factors(model, nn.CrossEntropyLoss(), x, y, seed=1, **kwargs)
    other = kfac_factors(model, nn.CrossEntropyLoss(), x, y, seed=2, **kwargs)
    for name in exact:
        torch.testing.assert_close(mc[name].G, again[name].G, rtol=0, atol=0)
        assert not torch.equal(mc[name].G, other[name].G)
        torch.testing.assert_close(mc[name].A, exact[name].A, **TOL)
        err = (mc[name].G - exact[name].G).norm() / exact[name].G.norm()
        assert err < 0.1, (name, err)


def test_reduce_gives_the_factors_of_the_whole_batch() -> None:
    # Two simulated ranks with equal shards: averaging each rank's flat factors equals one
    # process on the whole batch.
    model = cnn()
    x, y = batch(6, (2, 5, 5))
    loss_fn = nn.CrossEntropyLoss()
    full = kfac_factors(model, loss_fn, x, y)
    shards = [(x[:3], y[:3]), (x[3:], y[3:])]
    flats: list[Tensor] = []

    def record(t: Tensor) -> Tensor:
        flats.append(t.clone())
        return t

    for xs, ys in shards:
        kfac_factors(model, loss_fn, xs, ys, reduce=record)
    reduced = kfac_factors(model, loss_fn, *shards[0], reduce=lambda t: (t + flats[1]) / 2)
    for name in full:
        torch.testing.assert_close(reduced[name].A, full[name].A, **TOL)
        torch.testing.assert_close(reduced[name].G, full[name].G, **TOL)


def test_spectrum_is_the_kronecker_eigenvalue_products() -> None:
    model = cnn()
    x, y = batch(4, (2, 5, 5))
    factors = kfac_factors(model, nn.CrossEntropyLoss(), x, y)
    spectrum = kfac_spectrum(factors)
    blocks = []
    for name, f in factors.items():
        dense = torch.linalg.eigvalsh(torch.kron(f.G, f.A)).flip(0).clamp_min(0)
        torch.testing.assert_close(spectrum.per_layer[name], dense, rtol=1e-8, atol=1e-14)
        blocks.append(torch.kron(f.G, f.A))
    overall = torch.linalg.eigvalsh(torch.block_diag(*blocks)).flip(0).clamp_min(0)
    torch.testing.assert_close(spectrum.eigenvalues, overall, rtol=1e-8, atol=1e-14)
    assert spectrum.eigenvalues.numel() == sum(f.num_params for f in factors.values())


@pytest.mark.parametrize("relative", [True, False])
def test_eps_rank_counts_kronecker_eigenvalues(relative: bool) -> None:
    model = mlp()
    x, y = batch(3, (5,))  # few examples: rank-deficient factors
    factors = kfac_factors(model, nn.CrossEntropyLoss(), x, y)
    eigs = {n: torch.linalg.eigvalsh(torch.kron(f.G, f.A)) for n, f in factors.items()}
    largest = max(e.max() for e in eigs.values()).item()
    eps = 1e-4 if relative else 1e-6
    threshold = eps * largest if relative else eps
    result = kfac_eps_rank(factors, eps=eps, relative=relative)
    assert result.threshold == pytest.approx(threshold)
    for name, e in eigs.items():
        assert result.per_layer[name] == int((e > threshold).sum())
        assert result.per_layer_num_params[name] == e.numel()
        features = factors[name].A[:-1, :-1]  # all layers have a bias
        expected_er = effective_rank(torch.linalg.eigvalsh(features).clamp_min(0)).item()
        assert result.feature_effective_rank[name] == pytest.approx(expected_er, rel=1e-8)
    assert result.eps_rank == sum(result.per_layer.values())
    assert result.num_params == sum(e.numel() for e in eigs.values())
    assert 0 < result.eps_rank < result.num_params


def test_bad_arguments_raise_clear_errors() -> None:
    model = mlp()
    x, y = batch(3, (5,))
    with pytest.raises(ValueError, match="CrossEntropyLoss or nn.MSELoss"):
        kfac_factors(model, nn.NLLLoss(), x, y)
    with pytest.raises(ValueError, match="reduction='mean'"):
        kfac_factors(model, nn.MSELoss(reduction="sum"), x, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="mode"):
        kfac_factors(model, nn.CrossEntropyLoss(), x, y, mode="fisher")
    with pytest.raises(ValueError, match="mc_samples"):
        kfac_factors(model, nn.CrossEntropyLoss(), x, y, mode="mc", mc_samples=0)
    with pytest.raises(ValueError, match="ignore_index"):
        kfac_factors(model, nn.CrossEntropyLoss(), x, torch.tensor([0, -100, 1]))
    with pytest.raises(ValueError, match="eps"):
        kfac_eps_rank({}, eps=-1.0)
