"""HessianRankCallback: equals the pure function on the probe batch; any module; bad input."""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lightning_plasticity.callbacks import HessianRankCallback, KFACCallback
from lightning_plasticity.measures import hessian_eps_rank
from tests.callbacks.helpers import HistoryDump, LoggingModule, small_classifier, small_stream
from tests.data.helpers import fast_trainer


def test_boring_model_with_zero_arguments() -> None:
    cb = HessianRankCallback()
    trainer = fast_trainer(callbacks=[cb], max_steps=4, limit_val_batches=0)
    trainer.fit(BoringModel())
    assert [h["event"] for h in cb.history] == ["fit_start", "epoch_end"]
    assert "curvature/hessian_eps_rank" in trainer.callback_metrics
    assert cb.history[0]["curvature/hessian_num_params"] == 66


def test_first_measurement_equals_the_pure_function() -> None:
    class Snapshot(pl.Callback):
        def on_task_start(self, trainer, pl_module, task_id):  # noqa: ANN001, ANN201
            if task_id == 0:
                self.model = copy.deepcopy(pl_module.network)

    pl.seed_everything(0)
    snapshot, cb = Snapshot(), HessianRankCallback(probe_size=64, top_k=5, method="dense")
    dm = small_stream(num_tasks=2)
    fast_trainer(callbacks=[snapshot, cb], limit_val_batches=0).fit(small_classifier(),
                                                                    datamodule=dm)
    batch = dm.probe_batch(64, task_id=0)
    expected = hessian_eps_rank(snapshot.model.eval(),
                                lambda m, b: F.cross_entropy(m(b[0]), b[1]), batch,
                                method="dense")
    first = cb.history[0]
    assert first["curvature/hessian_eps_rank"] == expected.eps_rank
    assert first["curvature/hessian_top_eigenvalue"] == pytest.approx(expected.top_eigenvalue,
                                                                       rel=1e-5)
    assert len(first["curvature/hessian_top_eigenvalues"]) == 5
    assert first["curvature/hessian_num_params"] == sum(
        p.numel() for p in snapshot.model.parameters())
    assert -1.0 <= first["curvature/grad_hessian_overlap"] <= 1.0
    assert [h["task"] for h in cb.history] == [0, 1]


def test_last_layer_block() -> None:
    cb = HessianRankCallback(last_n_layers=1, probe_size=32)
    fast_trainer(callbacks=[cb], limit_val_batches=0).fit(small_classifier(),
                                                          datamodule=small_stream(num_tasks=1))
    assert cb.history[0]["curvature/hessian_num_params"] == 16 * 10 + 10


class Frozen(LoggingModule):
    def __init__(self) -> None:
        super().__init__()
        self.net.requires_grad_(False)
        self.bias = nn.Parameter(torch.zeros(10))  # trained, but frozen net is the block

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.net(x) + self.bias


@pytest.mark.parametrize(
    ("module", "callback", "message"),
    [
        (LoggingModule, lambda: HessianRankCallback(modules=["encoder.*"]),
         "matches no submodule"),
        (LoggingModule, lambda: HessianRankCallback(method="dense", max_dense_params=100),
         "exceeds max_dense_params=100; use method='lanczos'"),
        (LoggingModule, lambda: HessianRankCallback(
            loss_fn=lambda m, b: torch.tensor(float("nan"), requires_grad=True)),
         "loss on the probe batch is nan"),
        (Frozen, lambda: HessianRankCallback(modules=["net"]), "no trainable parameters"),
    ],
)
def test_bad_input_warns_and_training_goes_on(module, callback, message: str) -> None:  # noqa: ANN001
    cb = callback()
    trainer = fast_trainer(callbacks=[cb], limit_val_batches=0)
    with pytest.warns(UserWarning, match=message):
        trainer.fit(module(), datamodule=small_stream(num_tasks=2))
    assert trainer.global_step == 10 and cb.history == []


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="eps must be > 0"):
        HessianRankCallback(eps=0)
    with pytest.raises(ValueError, match="modules or last_n_layers, not both"):
        HessianRankCallback(modules=["a"], last_n_layers=1)
    with pytest.raises(ValueError, match="method must be auto, dense or lanczos"):
        HessianRankCallback(method="power")


def test_ddp_equals_one_process_on_the_same_probe(tmp_path: Path) -> None:
    def run(devices: int, folder: Path) -> dict:
        folder.mkdir()
        pl.seed_everything(0)
        model = small_classifier()
        model.network = model._network_factory((1, 8, 8), 10)  # same weights in every process
        callbacks = [HessianRankCallback(probe_size=64, method="dense"),
                     KFACCallback(probe_size=64), HistoryDump(str(folder))]
        kwargs: dict = {"devices": devices}
        if devices > 1:
            kwargs["strategy"] = DDPStrategy(start_method="spawn", process_group_backend="gloo",
                                             timeout=timedelta(seconds=60))
        fast_trainer(callbacks=callbacks, limit_val_batches=0, deterministic=False,
                     **kwargs).fit(model, datamodule=small_stream(num_tasks=1, batch_size=8))
        return {r: json.loads((folder / f"rank{r}.json").read_text()) for r in range(devices)}

    single = run(1, tmp_path / "single")[0]
    ddp = run(2, tmp_path / "ddp")
    assert ddp[0] == ddp[1]  # every rank logs the same numbers
    for name in ("HessianRankCallback", "KFACCallback"):
        one, two = single[name][0], ddp[0][name][0]
        for key, value in one.items():
            if "measure_seconds" in key:  # wall time: differs between runs
                assert two[key] > 0
            elif key.endswith("eps_rank") or key in ("task", "step", "event"):
                assert two[key] == value, key
            elif isinstance(value, list):
                torch.testing.assert_close(torch.tensor(two[key]), torch.tensor(value),
                                           rtol=1e-4, atol=1e-6)
            elif key != "curvature/grad_hessian_overlap":  # a cosine of two small vectors
                assert two[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_default_measures_the_whole_model_exact_or_estimated() -> None:
    # MLP 64-16-16-10: 1,482 parameters. Above max_dense_params the whole model is
    # estimated, never a block of it (whether "auto" picks dense below it is the timed cost
    # model's call, so the exact reference asks for it).
    exact = HessianRankCallback(probe_size=32, method="dense")
    estimate = HessianRankCallback(probe_size=32, max_dense_params=400)
    fast_trainer(callbacks=[exact, estimate], limit_val_batches=0).fit(
        small_classifier(), datamodule=small_stream(num_tasks=1))
    dense, lanczos = exact.history[0], estimate.history[0]
    assert dense["curvature/hessian_num_params"] == lanczos["curvature/hessian_num_params"] \
        == 1482
    assert dense["curvature/hessian_eps_rank_error"] == 0.0
    assert lanczos["curvature/hessian_eps_rank_error"] > 0
    # The estimate's ~95% error bar covers the exact count.
    assert abs(lanczos["curvature/hessian_eps_rank"] - dense["curvature/hessian_eps_rank"]) \
        <= lanczos["curvature/hessian_eps_rank_error"]
    assert lanczos["curvature/measure_seconds/hessian_rank"] > 0


def test_max_overhead_caps_the_estimate() -> None:
    # A tight budget: the estimate shrinks to the minimum number of products (and says what it
    # costs), the free one uses the default 1,000.
    cb = HessianRankCallback(probe_size=32, method="lanczos", max_overhead=1e-6)
    free = HessianRankCallback(probe_size=32, method="lanczos", max_overhead=None)
    fast_trainer(callbacks=[cb, free], limit_val_batches=0).fit(
        small_classifier(), datamodule=small_stream(num_tasks=2))
    assert cb.interval_seconds is not None and cb.interval_seconds > 0
    cheap, full = cb.history[-1], free.history[-1]
    assert cheap["curvature/measure_seconds/hessian_rank"] < \
        full["curvature/measure_seconds/hessian_rank"]
    assert cheap["curvature/hessian_eps_rank_error"] > full["curvature/hessian_eps_rank_error"]
    with pytest.raises(ValueError, match="max_overhead must be > 0"):
        HessianRankCallback(max_overhead=0)


def test_measurements_are_spaced_when_one_costs_more_than_max_overhead() -> None:
    # Tasks of 5 steps train for a few milliseconds: 300 products cost far more than 10% of
    # that, so the callback measures at every k-th task start (k > 1), says so, and resumes
    # the same spacing from its state.
    cb = HessianRankCallback(probe_size=32, method="lanczos", max_overhead=0.1, overlap=False)
    with pytest.warns(UserWarning, match=r"measures at one in every \d+ of them"):
        fast_trainer(callbacks=[cb], limit_val_batches=0).fit(
            small_classifier(), datamodule=small_stream(num_tasks=6))
    measured = [h["task"] for h in cb.history]
    assert measured[:2] == [0, 1] and len(measured) < 6
    assert cb._stride > 1
    state = cb.state_dict()
    again = HessianRankCallback(probe_size=32, method="lanczos", max_overhead=0.1)
    again.load_state_dict(state)
    assert (again._stride, again._pending) == (cb._stride, cb._pending)
    every = HessianRankCallback(probe_size=32, method="lanczos", max_overhead=None,
                                overlap=False)
    fast_trainer(callbacks=[every], limit_val_batches=0).fit(
        small_classifier(), datamodule=small_stream(num_tasks=3))
    assert [h["task"] for h in every.history] == [0, 1, 2]
