import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_plasticity.measures.gradient_interference import (
    gradient_interference,
    gradient_interference_from_gram,
    per_example_gradient_gram,
    per_example_gradients,
)
from lightning_plasticity.measures.parameter_selection import select_parameters

DT = torch.float64


def small_case(n: int = 6) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (n,), generator=g)
    return model, x, y


def explicit_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = []
    for i in range(x.shape[0]):
        params = [p for p in model.parameters()]
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_matches_explicit_per_example_loop() -> None:
    model, x, y = small_case()
    res = gradient_interference(model, F.cross_entropy, x, y)
    G = explicit_gradients(model, x, y)
    gram = G @ G.T
    norms = G.norm(dim=1)
    cosine = gram / (norms[:, None] * norms[None, :])
    torch.testing.assert_close(res.gram, gram, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(res.cosine, cosine, rtol=1e-10, atol=1e-12)
    off = ~torch.eye(6, dtype=torch.bool)
    assert res.mean_cosine == pytest.approx(float(cosine[off].mean()), rel=1e-10)
    assert res.num_params == sum(p.numel() for p in model.parameters())
    assert res.rank == 6  # 6 generic examples, 26 parameters
    torch.testing.assert_close(
        res.singular_values, torch.linalg.svdvals(G), rtol=1e-8, atol=1e-12
    )
    grads = per_example_gradients(model, F.cross_entropy, x, y)
    torch.testing.assert_close(grads["0.weight"][2].reshape(-1), G[2, :12])


def test_identical_examples_and_rank() -> None:
    model, x, y = small_case(4)
    x[1], y[1] = x[0], y[0]
    res = gradient_interference(model, F.cross_entropy, x, y)
    assert res.cosine[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert res.rank == 3 and res.rank_fraction == pytest.approx(0.75)

    # more examples than parameters: rank is bounded by the 3 parameters
    lin = nn.Linear(2, 1).to(DT).eval()
    xs = torch.randn(6, 2, dtype=DT)
    ys = torch.randn(6, 1, dtype=DT)
    assert gradient_interference(lin, F.mse_loss, xs, ys).rank == 3

    last = select_parameters(model, last_n_layers=1)
    part = gradient_interference(model, F.cross_entropy, x, y, params=last)
    assert part.num_params == 10


def test_gram_helper_and_model_untouched() -> None:
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], dtype=DT)
    res = gradient_interference_from_gram(g @ g.T)
    assert res.cosine.tolist() == [[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert res.mean_cosine == pytest.approx(-2 / 6)
    assert res.rank == 1

    model, x, y = small_case()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    gradient_interference(model, F.cross_entropy, x, y)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])

    bn = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).to(DT).train()
    with pytest.raises(ValueError, match="eval mode"):
        gradient_interference(bn, F.cross_entropy, x, y)


def test_example_gram_vectorised_equals_the_loop_for_any_loss_of_a_batch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    batch = {"x": torch.randn(6, 5, dtype=torch.float64), "y": torch.randint(0, 3, (6,)),
             "name": "meta"}

    def loss(b):  # noqa: ANN001, ANN202
        return F.cross_entropy(model(b["x"]), b["y"])

    def loss_with_item(b):  # noqa: ANN001, ANN202 - .item() is not vmap-able: the loop runs
        value = loss(b)
        assert value.item() >= 0
        return value

    named = list(model.named_parameters())
    looped, n_params, _ = per_example_gradient_gram(loss, batch, [p for _, p in named])
    vectorised, n_params2, _ = per_example_gradient_gram(loss, batch, named, model)
    fallback, _, _ = per_example_gradient_gram(loss_with_item, batch, named, model)
    assert n_params == n_params2 == sum(p.numel() for _, p in named)
    torch.testing.assert_close(vectorised, looped, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fallback, looped, rtol=0, atol=0)
