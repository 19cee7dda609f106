"""The measurement callbacks' shell: no side effects, any module, clear failures, resume."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn

from lightning_plasticity.callbacks import (
    ENTKCallback,
    FeatureRankCallback,
    GradientInterferenceCallback,
    HessianRankCallback,
    KFACCallback,
    ParameterStatsCallback,
    UnitActivityCallback,
)
from lightning_plasticity.callbacks.measurement import MeasurementCallback
from lightning_plasticity.callbacks.probe import module_loss
from tests.callbacks.helpers import LoggingModule, small_classifier, small_stream
from tests.data.helpers import fast_trainer, flat_params


def all_callbacks() -> list[pl.Callback]:
    return [KFACCallback(probe_size=32, on_task_end=True, every_n_train_steps=2),
            ENTKCallback(probe_size=16, on_task_end=True, every_n_train_steps=3),
            HessianRankCallback(probe_size=32, on_task_end=True, every_n_train_steps=4,
                                max_overhead=None),
            UnitActivityCallback(probe_size=32, every_n_train_steps=3),
            FeatureRankCallback(probe_size=32, on_task_end=True),
            ParameterStatsCallback(on_task_start=True),
            GradientInterferenceCallback(probe_size=8, every_n_train_steps=5)]


def test_callbacks_do_not_change_training() -> None:
    def train(callbacks: list[pl.Callback]) -> tuple[torch.Tensor, dict]:
        pl.seed_everything(0)
        model = small_classifier()
        trainer = fast_trainer(callbacks=callbacks, limit_val_batches=2)
        trainer.fit(model, datamodule=small_stream())
        return flat_params(model), model.trainer.optimizers[0].state_dict()

    plain_weights, plain_opt = train([])
    callbacks = all_callbacks()
    measured_weights, measured_opt = train(callbacks)
    assert torch.equal(plain_weights, measured_weights)
    for a, b in zip(plain_opt["state"].values(), measured_opt["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    kfac, entk, hessian, *others = callbacks
    assert all(cb.history for cb in others)
    assert len(hessian.history) == 3 + 3 + 3  # task starts, task ends, steps 4, 8, 12
    assert [h["event"] for h in kfac.history].count("task_start") == 3
    assert [h["event"] for h in kfac.history].count("task_end") == 3
    assert all(h["curvature/kfac_eps_rank"] > 0 for h in kfac.history)
    assert all(1 <= h["curvature/entk_rank"] <= 16 for h in entk.history)


def test_module_loss_of_a_foreign_module_suppresses_its_logging() -> None:
    module = LoggingModule()
    batch = (torch.randn(4, 64), torch.randint(0, 10, (4,)))
    expected = nn.functional.cross_entropy(module(batch[0]), batch[1])
    torch.testing.assert_close(module_loss(module, batch), expected)
    assert "log" not in vars(module)  # the no-op shadow is removed again


def test_foreign_module_with_task_stream() -> None:
    cb = ENTKCallback(probe_size=8)
    fast_trainer(callbacks=[cb], limit_val_batches=0).fit(
        LoggingModule(), datamodule=small_stream(num_tasks=2))
    assert [h["task"] for h in cb.history] == [0, 1]


def test_boring_model_falls_back_to_fit_start_and_steps() -> None:
    cb = ENTKCallback(probe_size=8, every_n_train_steps=4)
    fast_trainer(callbacks=[cb], max_steps=8, limit_val_batches=0).fit(BoringModel())
    # max_steps ends the first epoch: its end is measured too
    assert [h["event"] for h in cb.history] == ["fit_start", "step", "step", "epoch_end"]


def test_kfac_measures_single_tensor_batches_with_the_modules_own_loss() -> None:
    # BoringModel's batches are bare tensors and its loss is not a classifier's: KFAC reads the
    # head output and the Hessian of the module's own loss instead of skipping.
    cb = KFACCallback(probe_size=8, every_n_train_steps=2)
    fast_trainer(callbacks=[cb], max_steps=6, limit_val_batches=0).fit(BoringModel())
    assert [h["event"] for h in cb.history] == ["fit_start", "step", "step", "step", "epoch_end"]
    assert all(h["curvature/kfac_num_params"] == 66 for h in cb.history)


class NaNLoss(LoggingModule):
    def plasticity_loss(self, batch):  # noqa: ANN001, ANN201
        return torch.tensor(float("nan"))


def test_nan_loss_warns_once_and_training_goes_on() -> None:
    cb = KFACCallback(probe_size=8, loss_fn=lambda m, b: torch.tensor(float("nan")))
    with pytest.warns(UserWarning, match="loss on the probe batch is nan"):
        trainer = fast_trainer(callbacks=[cb], limit_val_batches=0)
        trainer.fit(LoggingModule(), datamodule=small_stream(num_tasks=2))
    assert trainer.global_step == 10 and cb.history == []


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: KFACCallback(eps=0), "eps must be > 0"),
        (lambda: KFACCallback(mode="fisher"), "mode must be 'exact' or 'mc'"),
        (lambda: ENTKCallback(probe_size=0), "probe_size must be >= 1"),
        (lambda: ENTKCallback(every_n_train_steps=0), "every_n_train_steps must be >= 1"),
        (lambda: ENTKCallback(on_task_start=False), "would never measure"),
        (lambda: ENTKCallback(method="exact"), "method must be auto, per_layer or jacobian"),
    ],
)
def test_bad_arguments(make, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        make()


def test_history_survives_resume() -> None:
    cb = KFACCallback(probe_size=8)
    fast_trainer(callbacks=[cb], limit_val_batches=0).fit(small_classifier(),
                                                          datamodule=small_stream(num_tasks=2))
    state = cb.state_dict()
    restored = KFACCallback(probe_size=8)
    restored.load_state_dict(state)
    assert restored.history == cb.history and len(cb.history) == 2
    assert KFACCallback(probe_size=8).state_key != KFACCallback(probe_size=8, eps=1e-3).state_key


def test_measurement_under_validation_inference_mode() -> None:
    class MeasureInValidation(pl.Callback):
        def __init__(self) -> None:
            self.inner = ENTKCallback(probe_size=8)

        def on_validation_batch_end(self, trainer, pl_module, *args):  # noqa: ANN001, ANN002, ANN201
            # Measure as if inside Lightning's inference_mode / no_grad evaluation context.
            with torch.inference_mode():
                self.inner.measure_now(trainer, pl_module, "validation", 0)
            with torch.no_grad():
                self.inner.measure_now(trainer, pl_module, "validation", 0)

    cb = MeasureInValidation()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*skipped the measurement.*")
        fast_trainer(callbacks=[cb], limit_val_batches=1).fit(
            small_classifier(), datamodule=small_stream(num_tasks=1))
    assert len(cb.inner.history) == 2


class Failing(MeasurementCallback):
    """A measurement whose computation fails the way a numerical library can."""

    def __init__(self, error: Exception) -> None:
        super().__init__(probe_size=8)
        self.error = error

    def compute(self, trainer, pl_module, batch, reduce):  # noqa: ANN001, ANN201
        raise self.error


@pytest.mark.parametrize("error", [torch.linalg.LinAlgError("eigh did not converge"),
                                   RuntimeError("out of memory"), KeyError("missing")])
def test_a_failing_computation_warns_once_and_training_goes_on(error: Exception) -> None:
    cb = Failing(error)
    with pytest.warns(UserWarning, match=f"skipped the measurement \\({type(error).__name__}"):
        trainer = fast_trainer(callbacks=[cb], limit_val_batches=0)
        trainer.fit(small_classifier(), datamodule=small_stream(num_tasks=3))
    assert trainer.global_step == 15 and cb.history == []


def test_probe_collects_as_many_training_batches_as_probe_size_needs() -> None:
    # BoringModel's loader yields batches of one example: the probe takes 16 of them, not 1.
    cb = GradientInterferenceCallback(probe_size=16)
    fast_trainer(callbacks=[cb], max_steps=2, limit_val_batches=0).fit(BoringModel())
    probe = cb._probe_source.batch
    assert probe.shape == (16, 32)
    first = cb.history[0]
    assert first["grads/rank"] > 1 and math.isfinite(first["grads/mean_cosine"])


@pytest.mark.parametrize("error", [AssertionError("shapes"), KeyError("image")])
def test_a_failing_plasticity_loss_warns_once_and_training_goes_on(error: Exception) -> None:
    class Faulty(LoggingModule):
        def plasticity_loss(self, batch):  # noqa: ANN001, ANN201
            raise error

    callbacks = [KFACCallback(probe_size=8), UnitActivityCallback(probe_size=8)]
    with pytest.warns(UserWarning, match=f"skipped the measurement \\({type(error).__name__}"):
        trainer = fast_trainer(callbacks=callbacks, limit_val_batches=0)
        trainer.fit(Faulty(), datamodule=small_stream(num_tasks=2))
    assert trainer.global_step == 10 and all(cb.history == [] for cb in callbacks)


def test_non_finite_results_are_logged_as_such() -> None:
    # A model whose gradient is zero: the gradient-Hessian overlap is 0/0.
    class Flat(LoggingModule):
        def plasticity_loss(self, batch):  # noqa: ANN001, ANN201
            return (self.net(batch[0]) * 0.0).sum()

    cb = HessianRankCallback(probe_size=8, method="dense", last_n_layers=1,
                             max_overhead=None)
    with pytest.warns(UserWarning, match="non-finite values .*grad_hessian_overlap"):
        trainer = fast_trainer(callbacks=[cb], limit_val_batches=0)
        trainer.fit(Flat(), datamodule=small_stream(num_tasks=1))
    assert math.isnan(cb.history[0]["curvature/grad_hessian_overlap"])
