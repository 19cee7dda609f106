import copy
import math

import pytest
import torch
from torch import nn

from lightning_plasticity.measures.plasticity_probe import plasticity_probe


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))


def inputs(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(5))


def test_deterministic_and_side_effect_free() -> None:
    model = make_model().eval()
    x = inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    a = plasticity_probe(model, x, steps=15, lr=1e-2, seed=3)
    b = plasticity_probe(model, x, steps=15, lr=1e-2, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert (a.initial_loss, a.final_loss) == (b.initial_loss, b.final_loss)
    assert torch.equal(a.losses, b.losses) and a.losses.shape == (15,)
    c = plasticity_probe(model, x, steps=15, lr=1e-2, seed=4)
    assert c.initial_loss != a.initial_loss  # other targets
    assert a.loss_reduction == pytest.approx(a.initial_loss - a.final_loss)
    assert a.loss_ratio == pytest.approx(a.final_loss / a.initial_loss)
    assert math.isnan(a.relative_final_loss) and "relative_final_loss" not in a.scalars()


def test_loss_decreases_and_fresh_comparison() -> None:
    model = make_model()
    x = inputs()
    res = plasticity_probe(model, x, steps=40, lr=1e-2, fresh_model=copy.deepcopy(model))
    assert res.final_loss < 0.75 * res.initial_loss
    # an identical "fresh" network follows the same trajectory
    assert res.fresh_final_loss == res.final_loss
    assert res.relative_final_loss == 1.0

    other = plasticity_probe(model, x, steps=40, lr=1e-2, fresh_model=make_model(seed=1))
    assert other.relative_final_loss == pytest.approx(other.final_loss / other.fresh_final_loss)

    labels = plasticity_probe(model, x, target="labels", steps=40, lr=1e-2, optimizer="sgd")
    assert labels.final_loss < labels.initial_loss
    mini = plasticity_probe(model, x, steps=10, lr=1e-2, batch_size=5)
    assert mini.losses.shape == (10,)
    assert mini.final_loss == plasticity_probe(model, x, steps=10, lr=1e-2, batch_size=5).final_loss


def test_bad_options() -> None:
    model, x = make_model(), inputs(4)
    with pytest.raises(ValueError, match="num_outputs"):
        plasticity_probe(model, x, num_outputs=5, steps=1)
    with pytest.raises(ValueError, match="num_outputs"):
        plasticity_probe(model, x, target="labels", num_outputs=4, steps=1)
    with pytest.raises(ValueError, match="target"):
        plasticity_probe(model, x, target="nope", steps=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="trainable"):
        frozen = make_model().requires_grad_(False)
        plasticity_probe(frozen, x, steps=1)
