"""HL-Gauss / two-hot categorical regression and ContinualRegressor's categorical losses."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lightning_plasticity.data import ContinualDataModule
from lightning_plasticity.models import MLP, ContinualRegressor
from lightning_plasticity.models.categorical_regression import (
    BinnedNetworkFactory,
    bin_centers,
    bin_edges,
    bin_width,
    categorical_regression_loss,
    expected_value,
    hl_gauss,
    two_hot,
)
from tests.data.helpers import fast_trainer

f64 = torch.float64


@pytest.mark.parametrize("endpoints", ["centers", "edges"])
def test_support_layout(endpoints: str) -> None:
    lo, hi, k = -2.0, 3.0, 6
    w = (hi - lo) / (k - 1 if endpoints == "centers" else k)
    assert bin_width(lo, hi, k, endpoints) == pytest.approx(w)
    centers = bin_centers(lo, hi, k, endpoints, dtype=f64)
    edges = bin_edges(lo, hi, k, endpoints, dtype=f64)
    assert centers.shape == (k,) and edges.shape == (k + 1,)
    torch.testing.assert_close(centers, (edges[1:] + edges[:-1]) / 2)
    torch.testing.assert_close(edges.diff(), torch.full((k,), w, dtype=f64))
    if endpoints == "centers":
        assert centers[0].item() == lo and centers[-1].item() == pytest.approx(hi)
    else:
        assert edges[0].item() == lo and edges[-1].item() == pytest.approx(hi)


@pytest.mark.parametrize("endpoints", ["centers", "edges"])
def test_two_hot_on_centers_is_one_hot(endpoints: str) -> None:
    centers = bin_centers(-1.0, 4.0, 11, endpoints, dtype=f64)
    probs = two_hot(centers, -1.0, 4.0, 11, endpoints)
    torch.testing.assert_close(probs, torch.eye(11, dtype=f64))


def test_two_hot_between_centers_is_the_linear_split() -> None:
    lo, hi, k = 0.0, 10.0, 6  # centers 0, 2, ..., 10
    targets = torch.tensor([[0.5, 3.0], [7.9, 9.99]], dtype=f64)
    probs = two_hot(targets, lo, hi, k)
    expected = torch.zeros(2, 2, k, dtype=f64)
    for idx in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        y = targets[idx].item()
        i = int(y // 2.0)
        expected[idx][i], expected[idx][i + 1] = (2.0 * (i + 1) - y) / 2.0, (y - 2.0 * i) / 2.0
    torch.testing.assert_close(probs, expected)
    assert probs.dtype == f64


@pytest.mark.parametrize("endpoints", ["centers", "edges"])
def test_two_hot_decodes_back_and_clips(endpoints: str) -> None:
    lo, hi, k = -3.0, 7.0, 21
    centers = bin_centers(lo, hi, k, endpoints, dtype=f64)
    targets = torch.linspace(centers[0].item(), centers[-1].item(), 97, dtype=f64)
    decoded = expected_value(torch.log(two_hot(targets, lo, hi, k, endpoints)), lo, hi, k,
                             endpoints)
    torch.testing.assert_close(decoded, targets)
    outside = two_hot(torch.tensor([-100.0, 100.0], dtype=f64), lo, hi, k, endpoints)
    torch.testing.assert_close(outside, torch.eye(k, dtype=f64)[[0, -1]])
    ints = two_hot(torch.tensor([0, 1]), lo, hi, k, endpoints)  # integer targets
    assert ints.is_floating_point() and ints.sum(-1).allclose(torch.ones(2))


@pytest.mark.parametrize("endpoints", ["centers", "edges"])
@pytest.mark.parametrize("sigma", [None, 0.1, 2.0])
def test_hl_gauss_matches_normal_cdf(endpoints: str, sigma: float | None) -> None:
    stats = pytest.importorskip("scipy.stats")
    lo, hi, k = -2.0, 2.0, 9
    targets = torch.tensor([[-2.0, -1.3], [0.0, 0.77], [1.99, 2.0]], dtype=f64)
    probs = hl_gauss(targets, lo, hi, k, sigma, endpoints)
    edges = bin_edges(lo, hi, k, endpoints, dtype=f64).numpy()
    s = 0.75 * bin_width(lo, hi, k, endpoints) if sigma is None else sigma
    for idx in [(i, j) for i in range(3) for j in range(2)]:
        cdf = stats.norm.cdf(edges, loc=targets[idx].item(), scale=s)
        mass = (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0])
        torch.testing.assert_close(probs[idx], torch.from_numpy(mass), rtol=1e-9, atol=1e-12)
    # Outside the range: clipped to it.
    torch.testing.assert_close(hl_gauss(torch.tensor([9.0], dtype=f64), lo, hi, k, sigma,
                                        endpoints),
                               hl_gauss(torch.tensor([2.0], dtype=f64), lo, hi, k, sigma,
                                        endpoints))


@pytest.mark.parametrize("kind", ["hl_gauss", "two_hot"])
def test_loss_is_the_cross_entropy(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    lo, hi, k = -1.0, 5.0, 13
    logits = torch.randn(4, 3, k, generator=g, dtype=f64)
    targets = torch.rand(4, 3, generator=g, dtype=f64) * 8 - 2  # some outside the range
    loss = categorical_regression_loss(logits, targets, lo, hi, k, kind=kind)
    p = hl_gauss(targets, lo, hi, k) if kind == "hl_gauss" else two_hot(targets, lo, hi, k)
    torch.testing.assert_close(loss, -(p * torch.log_softmax(logits, -1)).sum(-1).mean())
    assert loss.shape == () and loss.dtype == f64
    # Lower precision is computed in float32.
    half = categorical_regression_loss(logits.half(), targets.half(), lo, hi, k, kind=kind)
    assert half.dtype == torch.float32


@pytest.mark.parametrize("kind", ["hl_gauss", "two_hot"])
def test_gradcheck(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 2, 7, generator=g, dtype=f64, requires_grad=True)
    targets = torch.tensor([[0.1, 0.35], [0.45, 0.62], [0.81, 0.97]], dtype=f64)  # not on a center
    fn = partial(categorical_regression_loss, value_min=0.0, value_max=1.0, num_bins=7,
                 kind=kind)
    assert torch.autograd.gradcheck(lambda x: fn(x, targets), (logits,))
    # Both target distributions are differentiable in the target between centers.
    t = targets.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: fn(logits.detach(), y), (t,))


@pytest.mark.parametrize("kind", ["hl_gauss", "two_hot"])
def test_shift_and_scale_invariance(kind: str) -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 1, 21, generator=g, dtype=f64)
    targets = torch.randn(16, 1, generator=g, dtype=f64) * 2
    sigma = 0.3 if kind == "hl_gauss" else None
    base = categorical_regression_loss(logits, targets, -4.0, 4.0, 21, kind=kind, sigma=sigma)
    shift = 1000.0
    shifted = categorical_regression_loss(logits, targets + shift, shift - 4.0, shift + 4.0, 21,
                                          kind=kind, sigma=sigma)
    torch.testing.assert_close(shifted, base)
    scale = 250.0
    scaled = categorical_regression_loss(logits, targets * scale, -4.0 * scale, 4.0 * scale, 21,
                                         kind=kind, sigma=None if sigma is None else sigma * scale)
    torch.testing.assert_close(scaled, base)


def test_bad_arguments() -> None:
    t, logits = torch.zeros(2), torch.zeros(2, 5)
    with pytest.raises(ValueError, match="num_bins must be an int >= 2"):
        two_hot(t, 0.0, 1.0, 1)
    with pytest.raises(ValueError, match="value_min < value_max"):
        hl_gauss(t, 1.0, 1.0, 5)
    with pytest.raises(ValueError, match="value_min < value_max"):
        bin_centers(0.0, math.inf, 5)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        hl_gauss(t, 0.0, 1.0, 5, sigma=0.0)
    with pytest.raises(ValueError, match="Unknown kind 'mse'"):
        categorical_regression_loss(logits, t, 0.0, 1.0, 5, kind="mse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only applies to kind='hl_gauss'"):
        categorical_regression_loss(logits, t, 0.0, 1.0, 5, kind="two_hot", sigma=0.1)
    with pytest.raises(ValueError, match=r"logits must have shape .*\(2, 4\)"):
        categorical_regression_loss(logits, t, 0.0, 1.0, 4)
    with pytest.raises(ValueError, match="Unknown endpoints"):
        bin_edges(0.0, 1.0, 4, endpoints="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_bins=4 entries"):
        expected_value(logits, 0.0, 1.0, 4)
    with pytest.raises(ValueError, match="num_bins must be an int >= 2"):
        BinnedNetworkFactory(MLP, 1)


def test_regressor_bad_arguments() -> None:
    with pytest.raises(ValueError, match="Unknown loss 'huber'"):
        ContinualRegressor(loss="huber")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs value_range=\\(value_min, value_max\\)"):
        ContinualRegressor(loss="hl_gauss")
    with pytest.raises(ValueError, match="value_range and sigma only apply"):
        ContinualRegressor(value_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="only applies to loss='hl_gauss'"):
        ContinualRegressor(loss="two_hot", value_range=(0.0, 1.0), sigma=0.1)
    with pytest.raises(ValueError, match="value_min < value_max"):
        ContinualRegressor(loss="two_hot", value_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="num_bins must be an int >= 2"):
        ContinualRegressor(loss="hl_gauss", value_range=(0.0, 1.0), num_bins=1)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        ContinualRegressor(loss="hl_gauss", value_range=(0.0, 1.0), sigma=-1.0)
    model = ContinualRegressor(input_shape=(4,), num_outputs=1, loss="two_hot",
                               value_range=(0.0, 1.0), num_bins=5)
    with pytest.raises(ValueError, match="num_targets \\* num_bins network outputs"):
        model.loss(torch.zeros(2, 7), torch.zeros(2, 1))


def test_mse_default_unchanged() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)
    torch.manual_seed(0)
    model = ContinualRegressor(input_shape=(5,), num_outputs=2)
    torch.manual_seed(0)
    reference = MLP((5,), 2)  # the same network, built from the same random state
    for a, b in zip(model.network.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    expected = F.mse_loss(reference(x), y)
    assert torch.equal(model.loss(model(x), y), expected)
    assert torch.equal(model.plasticity_loss((x, y)), expected)
    assert torch.equal(model.training_step((x, y), 0)["loss"], expected)
    assert torch.equal(model._val_metrics(model(x), y)["val_loss"], expected)
    assert torch.equal(model.decode(model(x)), model(x))
    assert model.hparams.loss == "mse" and model.hparams.num_outputs == 2


@pytest.mark.parametrize("kind", ["hl_gauss", "two_hot"])
def test_regressor_categorical_loss_on_a_batch(kind: str) -> None:
    lo, hi, k = 90.0, 110.0, 21
    model = ContinualRegressor(input_shape=(5,), num_outputs=2, loss=kind, value_range=(lo, hi),
                               num_bins=k)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(8, 5, generator=g), 100.0 + torch.randn(8, 2, generator=g)
    outputs = model(x)
    assert outputs.shape == (8, 2 * k)
    logits = outputs.reshape(8, 2, k)  # k consecutive logits per target
    expected = categorical_regression_loss(logits, y, lo, hi, k, kind=kind)
    torch.testing.assert_close(model.loss(outputs, y), expected)
    torch.testing.assert_close(model.plasticity_loss((x, y)), expected)
    torch.testing.assert_close(model.training_step((x, y), 0)["loss"], expected)
    predictions = model.decode(outputs)
    torch.testing.assert_close(predictions, expected_value(logits, lo, hi, k))
    torch.testing.assert_close(model._val_metrics(outputs, y)["val_loss"],
                               F.mse_loss(predictions, y))
    # One target given as shape (batch,) works too.
    single = ContinualRegressor(input_shape=(5,), num_outputs=1, loss=kind, value_range=(lo, hi),
                                num_bins=k)
    assert single.loss(single(x), y[:, 0]).isfinite()


def test_regressor_trains_on_large_random_targets(tmp_path) -> None:  # noqa: ANN001
    mean, scale = 100.0, 2.0
    dm = ContinualDataModule("digits", "random_targets", num_tasks=2, steps_per_task=4,
                             batch_size=16, val_size=32, target_mean=mean, target_scale=scale,
                             target_dim=2)
    model = ContinualRegressor(network=partial(MLP, width=16), loss="hl_gauss",
                               value_range=(mean - 4 * scale, mean + 4 * scale), num_bins=11)
    trainer = fast_trainer(limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert model.hparams.num_outputs == 2 and model.hparams.input_shape == (1, 8, 8)
    assert model.network.num_outputs == 22
    val_loss = trainer.callback_metrics["task/val_loss"]
    assert torch.isfinite(val_loss) and val_loss < 5 * scale**2  # MSE of decoded predictions
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = ContinualRegressor.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=False)
    assert loaded.loss_kind == "hl_gauss" and loaded.network.num_outputs == 22
    for a, b in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(a, b)
