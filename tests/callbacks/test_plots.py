"""TaskMetricsPlot and MeasurementsPlot: what they collect, where they write, bad arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_plasticity.callbacks import (
    ENTKCallback,
    MeasurementsPlot,
    ParameterStatsCallback,
    TaskMetricsPlot,
    UnitActivityCallback,
)
from tests.callbacks.helpers import small_classifier, small_stream
from tests.data.helpers import fast_trainer

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_accuracy_and_measurements_against_tasks(tmp_path: Path) -> None:
    units = UnitActivityCallback(probe_size=16, on_task_end=True)
    plot = MeasurementsPlot(dirpath=tmp_path)
    trainer = fast_trainer(callbacks=[units, ParameterStatsCallback(), plot],
                           limit_val_batches=0)
    trainer.fit(small_classifier(), datamodule=small_stream(num_tasks=3))
    assert plot.last_path == tmp_path / "measurements.png"
    assert plot.last_path.read_bytes()[:8] == PNG
    series = MeasurementsPlot.series(trainer)
    # x is in tasks (step / steps_per_task): starts at 0, 1, 2 and ends at 1, 2, 3.
    assert [x for x, _ in series["units/dead_fraction"]["task start"]] == [0.0, 1.0, 2.0]
    assert [x for x, _ in series["units/dead_fraction"]["task end"]] == [1.0, 2.0, 3.0]
    assert [x for x, _ in series["task/end_accuracy"]["task end"]] == [1.0, 2.0, 3.0]
    values = [v for _, v in series["units/dead_fraction"]["task start"]]
    assert values == [h["units/dead_fraction"] for h in units.history
                      if h["event"] == "task_start"]
    assert "params/total/norm" in series


def test_chosen_metrics_missing_ones_warn_and_nothing_to_plot_warns(tmp_path: Path) -> None:
    plot = MeasurementsPlot(metrics=["task/online_accuracy", "units/dead_fraction"],
                            dirpath=tmp_path, filename="mine.png")
    with pytest.warns(UserWarning, match=r"nothing measured yet for \['units/dead_fraction'\]"):
        fast_trainer(callbacks=[plot], limit_val_batches=0).fit(
            small_classifier(), datamodule=small_stream(num_tasks=2))
    assert (tmp_path / "mine.png").read_bytes()[:8] == PNG
    empty = MeasurementsPlot(metrics=["units/dead_fraction"], dirpath=tmp_path / "empty")
    with pytest.warns(UserWarning, match="no measurements to plot"):
        fast_trainer(callbacks=[empty], limit_val_batches=0).fit(
            small_classifier(), datamodule=small_stream(num_tasks=2))
    assert empty.last_path is None


def test_task_metrics_plot_writes_every_n_tasks_and_at_the_end(tmp_path: Path) -> None:
    class Spy(TaskMetricsPlot):
        def draw(self, trainer):  # noqa: ANN001, ANN201
            self.drawn.append(len(trainer.datamodule.task_history))
            return super().draw(trainer)

    plot = Spy(metric="end_loss", filename="loss.png", dirpath=tmp_path, every_n_tasks=2)
    plot.drawn = []
    fast_trainer(callbacks=[plot], limit_val_batches=0).fit(
        small_classifier(), datamodule=small_stream(num_tasks=4))
    # After tasks 2 and 4 (the task's own record is added before its end event), and at the end.
    assert plot.drawn == [2, 4, 4]
    assert plot.last_path == tmp_path / "loss.png" and plot.last_path.read_bytes()[:8] == PNG
    assert plot.wandb_key == "task/end_loss_plot"
    missing = TaskMetricsPlot(metric="nonexistent", dirpath=tmp_path / "none")
    with pytest.warns(UserWarning, match="no 'nonexistent' in the task history"):
        fast_trainer(callbacks=[missing], limit_val_batches=0).fit(
            small_classifier(), datamodule=small_stream(num_tasks=1))
    assert missing.last_path is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"filename": "plot.jpg"}, "must end with .png"),
        ({"every_n_tasks": 0}, "every_n_tasks must be >= 1"),
        ({"ncols": 0}, "ncols must be >= 1"),
        ({"metrics": "units/dead_fraction"}, "must be a list of names"),
        ({"metrics": ["dead_fraction"]}, "must be a list of names"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MeasurementsPlot(**kwargs)
    if "metrics" not in kwargs and "ncols" not in kwargs:
        with pytest.raises(ValueError, match=message):
            TaskMetricsPlot(**kwargs)


def test_measurements_without_a_task_stream_are_plotted_against_epochs(tmp_path: Path) -> None:
    # BoringModel: 64 batches an epoch, no ContinualDataModule; step-scheduled points are kept.
    cb = ENTKCallback(probe_size=4, every_n_train_steps=16)
    plot = MeasurementsPlot(metrics=["curvature/entk_rank"], dirpath=tmp_path)
    trainer = fast_trainer(callbacks=[cb, plot], max_steps=64, limit_val_batches=0)
    trainer.fit(BoringModel())
    series = MeasurementsPlot.series(trainer)["curvature/entk_rank"]
    assert MeasurementsPlot.progress_unit(trainer) == ("epoch", 64.0)
    assert sorted(x for x, _ in series["step"]) == [0.25, 0.5, 0.75, 1.0]
    assert [x for x, _ in series["fit start"]] == [0.0]
    assert [x for x, _ in series["epoch end"]] == [1.0]
    assert (tmp_path / "measurements.png").is_file()
