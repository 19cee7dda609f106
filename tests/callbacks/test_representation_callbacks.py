"""Unit, feature, parameter and gradient callbacks: trends, DDP, resume, bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from lightning_plasticity.callbacks import (
    ENTKCallback,
    FeatureRankCallback,
    GradientInterferenceCallback,
    KFACCallback,
    ParameterStatsCallback,
    PlasticityProbeCallback,
    UnitActivityCallback,
)
from lightning_plasticity.data import ContinualDataModule
from lightning_plasticity.models import MLP, ContinualClassifier
from tests.callbacks.helpers import (
    HistoryDump,
    NoForwardReLU,
    small_classifier,
    small_stream,
    without_timing,
)
from tests.data.helpers import fast_trainer


def test_quickstart_trends_match_the_seeds() -> None:
    """A ReLU MLP with Adam (lr 0.01) on label-permuted digits, as in recipes/quickstart.yaml:
    dead units accumulate, the feature rank collapses and the weight norm grows."""
    pl.seed_everything(0)
    units = UnitActivityCallback(on_task_start=False)
    features = FeatureRankCallback(on_task_start=False, on_task_end=True)
    params = ParameterStatsCallback()
    dm = ContinualDataModule("digits", "permuted_labels", num_tasks=10, steps_per_task=100,
                             batch_size=32)
    model = ContinualClassifier(network=partial(MLP, width=128), lr=0.01)
    fast_trainer(callbacks=[units, features, params], limit_val_batches=0).fit(model,
                                                                               datamodule=dm)

    def first_last(cb: pl.Callback, key: str) -> tuple[float, float]:
        values = [h[key] for h in cb.history]
        return sum(values[:2]) / 2, sum(values[-2:]) / 2

    dead_first, dead_last = first_last(units, "units/dead_fraction")
    rank_first, rank_last = first_last(features, "features/effective_rank")
    norm_first, norm_last = first_last(params, "params/total/norm")
    assert dead_last > dead_first + 0.2
    assert rank_last < 0.75 * rank_first
    assert norm_last > 1.2 * norm_first


def _package_classifier() -> pl.LightningModule:
    model = small_classifier()
    model.network = model._network_factory((1, 8, 8), 10)
    return model


@pytest.mark.parametrize("make_model", [_package_classifier, NoForwardReLU],
                         ids=["package_classifier", "no_forward_functional_relu"])
def test_ddp_equals_one_process(tmp_path: Path, make_model: Callable) -> None:
    def run(devices: int, folder: Path) -> dict:
        folder.mkdir()
        pl.seed_everything(0)
        model = make_model()
        callbacks = [UnitActivityCallback(probe_size=64), FeatureRankCallback(probe_size=64),
                     ParameterStatsCallback(on_task_start=True),
                     GradientInterferenceCallback(probe_size=16),
                     PlasticityProbeCallback(steps=5, probe_size=16),
                     KFACCallback(probe_size=64), ENTKCallback(probe_size=8),
                     HistoryDump(str(folder))]
        kwargs: dict = {"devices": devices}
        if devices > 1:
            kwargs["strategy"] = DDPStrategy(start_method="spawn", process_group_backend="gloo",
                                             timeout=timedelta(seconds=60))
        fast_trainer(callbacks=callbacks, limit_val_batches=0, deterministic=False,
                     max_steps=1, **kwargs).fit(model, datamodule=small_stream(num_tasks=1,
                                                                                batch_size=8))
        return {r: json.loads((folder / f"rank{r}.json").read_text()) for r in range(devices)}

    single = run(1, tmp_path / "single")[0]
    ddp = run(2, tmp_path / "ddp")
    assert repr(ddp[0]) == repr(ddp[1])
    for name, history in single.items():
        one, two = history[0], ddp[0][name][0]  # the task-start measurement, before training
        assert one.keys() == two.keys(), name
        for key, value in one.items():
            if isinstance(value, list):
                torch.testing.assert_close(torch.tensor(two[key]), torch.tensor(value),
                                           rtol=1e-4, atol=1e-5)
            elif isinstance(value, float) and "grad_norm" not in key:
                assert two[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key


def test_parameter_anchor_and_histories_survive_resume(tmp_path: Path) -> None:
    params, units = ParameterStatsCallback(), UnitActivityCallback()
    trainer = fast_trainer(callbacks=[params, units], limit_val_batches=0)
    model = small_classifier()
    trainer.fit(model, datamodule=small_stream(num_tasks=2))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=False)
    resumed_params, resumed_units = ParameterStatsCallback(), UnitActivityCallback()
    resumed_params.load_state_dict(checkpoint["callbacks"][params.state_key])
    resumed_units.load_state_dict(checkpoint["callbacks"][units.state_key])
    assert without_timing(resumed_units.history) == without_timing(units.history)
    assert len(units.history) == 4
    assert without_timing(resumed_params.history) == without_timing(params.history)
    for name, value in params.init.items():
        assert torch.equal(resumed_params.init[name], value)
    # The anchor is the initialisation, not the trained weights.
    assert params.history[-1]["params/total/distance_from_init"] > 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: UnitActivityCallback(tau=-0.1), "need tau >= 0"),
        (lambda: UnitActivityCallback(rare_fraction=1.5), "0 < rare_fraction < 1"),
        (lambda: FeatureRankCallback(delta=0), "0 < delta < 1"),
        (lambda: ParameterStatsCallback(wasserstein_p=3), "wasserstein_p must be 1 or 2"),
    ],
)
def test_bad_arguments(make, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        make()


def test_unknown_feature_layer_warns_and_training_goes_on() -> None:
    cb = FeatureRankCallback(layer="encoder.*")
    trainer = fast_trainer(callbacks=[cb], limit_val_batches=0)
    with pytest.warns(UserWarning, match="matches no module"):
        trainer.fit(small_classifier(), datamodule=small_stream(num_tasks=2))
    assert trainer.global_step == 10 and cb.history == []


def test_plasticity_probe_runs_on_a_copy_and_is_deterministic() -> None:
    from tests.data.helpers import flat_params

    def train(callbacks: list) -> torch.Tensor:
        pl.seed_everything(0)
        model = small_classifier()
        fast_trainer(callbacks=callbacks, limit_val_batches=0).fit(
            model, datamodule=small_stream(num_tasks=2))
        return flat_params(model)

    probe, again = PlasticityProbeCallback(steps=20), PlasticityProbeCallback(steps=20)
    weights = train([probe])
    assert torch.equal(weights, train([]))  # training is untouched by the probe
    train([again])
    assert without_timing(probe.history) == without_timing(again.history)
    assert len(probe.history) == 2
    first = probe.history[0]
    assert first["plasticity/loss_reduction"] > 0
    assert first["plasticity/relative_final_loss"] == pytest.approx(
        first["plasticity/final_loss"] / first["plasticity/fresh_final_loss"])
    with pytest.raises(ValueError, match="need steps >= 1"):
        PlasticityProbeCallback(steps=0)
