"""WandbTaskAxis: task/id as the wandb x-axis, spectra tables, the accuracy vs eps-rank plot.

The end-to-end test reads the offline wandb run of the small quickstart (run through the CLI by
the ``quickstart_run`` fixture) with ``tests/wandb_records.py``; the others drive the callback's
pieces directly with stand-ins for the trainer and the wandb run.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from lightning_plasticity.callbacks import WandbTaskAxis
from lightning_plasticity.callbacks.wandb_task_axis import (
    SCATTER_KEY,
    TASK_AXIS,
    accuracy_vs_eps_rank_rows,
    is_task_indexed,
    log_spectra,
)
from tests.quickstart_runs import NUM_TASKS
from tests.wandb_records import (
    history_rows,
    metric_definitions,
    offline_run_file,
    read_records,
)

EIGENVALUES = "curvature/hessian_top_eigenvalues"
TASK_LEVEL = ["task/end_accuracy", "task/online_accuracy", "task/end_loss", "task/val_accuracy",
              "curvature/hessian_eps_rank", "curvature/hessian_eps_rank_normalized",
              "curvature/hessian_top_eigenvalue", "curvature/grad_hessian_overlap"]


def _run_file(quickstart_run: tuple[Path, Any]) -> Path:
    return offline_run_file(quickstart_run[0] / "runs" / "wandb")


def test_the_offline_run_defines_task_id_as_the_axis(quickstart_run: tuple[Path, Any]) -> None:
    definitions = metric_definitions(_run_file(quickstart_run))
    # Lightning's own glob comes first; ours are defined after it ...
    assert definitions["*"]["step_metric"] == "trainer/global_step"
    for glob in ("task/end_*", "task/online_*", "task/val_*", "curvature/*", "units/*",
                 "features/*", "params/*", "intervention/*"):
        assert definitions[glob] == {"step_metric": TASK_AXIS, "glob": True,
                                     "step_sync": True}, glob
    # ... so every task-level key is also defined by name (wandb resolves a key that matches
    # two globs to the first one), and step-level keys are left on the global step.
    for key in [*TASK_LEVEL, "task/steps_to_target", EIGENVALUES, f"{EIGENVALUES}_table"]:
        assert definitions[key]["step_metric"] == TASK_AXIS, key
        assert not definitions[key]["glob"]
    assert "task/train_loss" not in definitions


def test_every_task_level_row_carries_its_task(quickstart_run: tuple[Path, Any]) -> None:
    rows = history_rows(_run_file(quickstart_run))
    tasked = [r for r in rows if any(k in r for k in TASK_LEVEL)]
    assert tasked
    for row in tasked:
        assert TASK_AXIS in row, sorted(row)
    # Task-end metrics: one row per task, each with its own task id (task 0 logged no training
    # step at all: 10 steps per task, log_every_n_steps 20).
    ends = [(r[TASK_AXIS], r["task/end_accuracy"]) for r in rows if "task/end_accuracy" in r]
    assert [t for t, _ in ends] == list(range(NUM_TASKS))
    # The Hessian is measured at each task's start: before any step of the new task.
    starts = [(r[TASK_AXIS], r["trainer/global_step"]) for r in rows
              if "curvature/hessian_eps_rank" in r]
    assert starts == [(t, 10 * t) for t in range(NUM_TASKS)]


def test_the_spectra_go_to_incremental_tables(quickstart_run: tuple[Path, Any]) -> None:
    run_file = _run_file(quickstart_run)
    key = f"{EIGENVALUES}_table"
    logged = [r for r in history_rows(run_file) if f"{key}/_type" in r]
    assert [r[TASK_AXIS] for r in logged] == list(range(NUM_TASKS))
    assert {r[f"{key}/_type"] for r in logged} == {"incremental-table-file"}
    assert [r[f"{key}/increment_num"] for r in logged] == list(range(NUM_TASKS))
    # The histogram of the same spectrum is still sent.
    assert all(r[f"{EIGENVALUES}/_type"] == "histogram" for r in logged)
    # The table files hold (task, index, eigenvalue), one row per eigenvalue, largest first.
    rows = []
    for r in logged:
        table = json.loads((run_file.parent / "files" / r[f"{key}/path"]).read_text())
        assert table["columns"] == ["task", "index", "eigenvalue"]
        rows += table["data"]
    tasks = sorted({row[0] for row in rows})
    assert tasks == list(range(NUM_TASKS))
    for task in tasks:
        mine = [row for row in rows if row[0] == task]
        assert [row[1] for row in mine] == list(range(1, len(mine) + 1))
        values = [row[2] for row in mine]
        assert values == sorted(values, reverse=True) and len(values) == 20


def test_the_accuracy_vs_eps_rank_scatter_plot(quickstart_run: tuple[Path, Any]) -> None:
    run_file = _run_file(quickstart_run)
    rows = [r for r in history_rows(run_file) if f"{SCATTER_KEY}_table/_type" in r]
    assert len(rows) == 1
    table = json.loads((run_file.parent / "files" /
                        rows[0][f"{SCATTER_KEY}_table/path"]).read_text())
    assert table["columns"] == ["task", "hessian_eps_rank_normalized", "end_accuracy"]
    assert [row[0] for row in table["data"]] == list(range(NUM_TASKS))
    assert all(0 < row[1] <= 1 and 0 <= row[2] <= 1 for row in table["data"])
    # ... drawn as wandb's scatter preset over that table.
    visualize = {}
    for record in read_records(run_file):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                if list(item.nested_key[:2]) == ["_wandb", "visualize"]:
                    visualize[item.nested_key[2]] = json.loads(item.value_json)
    config = visualize[SCATTER_KEY]["panel_config"]
    assert config["panelDefId"] == "wandb/scatter/v0"
    assert config["fieldSettings"] == {"x": "hessian_eps_rank_normalized", "y": "end_accuracy"}


# ---------------------------------------------------------------------- pieces, with stand-ins
class FakeRun:
    """Records what a wandb run is asked to do."""

    def __init__(self, fail: bool = False) -> None:
        self.defined: list[tuple[str, str | None]] = []
        self.logged: list[dict[str, Any]] = []
        self.fail = fail

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.defined.append((name, step_metric))

    def log(self, row: dict[str, Any]) -> None:
        if self.fail:
            raise RuntimeError("wandb is down")
        self.logged.append(row)


class FakeLogger:
    def __init__(self, run: FakeRun) -> None:
        self.experiment = run
        self.rows: list[tuple[dict[str, Any], int | None]] = []

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.rows.append((dict(metrics), step))


def _trainer(callbacks: list[Any], task_id: int = 0, **kwargs: Any) -> SimpleNamespace:
    defaults = dict(callbacks=callbacks, datamodule=SimpleNamespace(task_id=task_id),
                    current_epoch=7, is_global_zero=True, loggers=[])
    return SimpleNamespace(**{**defaults, **kwargs})


def test_rows_get_the_task_and_keys_are_defined_once() -> None:
    axis = WandbTaskAxis()
    run = FakeRun()
    logger = FakeLogger(run)
    trainer = _trainer([axis], task_id=4)
    step_row = {"task/train_loss": 0.5, "task/id": 4.0}
    assert axis.with_task_axis(trainer, logger, step_row) is step_row  # untouched
    row = axis.with_task_axis(trainer, logger, {"units/dead_fraction": 0.1, "epoch": 3})
    assert row == {"units/dead_fraction": 0.1, "epoch": 3, TASK_AXIS: 4}
    axis.with_task_axis(trainer, logger, {"units/dead_fraction": 0.2})
    assert run.defined == [("units/dead_fraction", TASK_AXIS)]
    # Without a task stream the task is the epoch.
    no_stream = _trainer([axis], datamodule=None)
    assert axis.with_task_axis(no_stream, logger, {"params/total/norm": 1.0})[TASK_AXIS] == 7


def test_a_measurement_callbacks_own_prefix_is_task_indexed() -> None:
    class MyMeasure:
        prefix = "mine"
        history: list = []

    axis = WandbTaskAxis(prefixes=["curvature"])
    trainer = _trainer([axis, MyMeasure()])
    row = axis.with_task_axis(trainer, FakeLogger(FakeRun()), {"mine/thing": 1.0})
    assert row[TASK_AXIS] == 0
    assert not is_task_indexed("mine/thing", ["curvature"])


def test_spectrum_tables_send_new_rows_and_restore_a_resumed_history() -> None:
    class Restored:  # a measurement callback whose history came back from a checkpoint
        history = [{"task": 0, "event": "task_start", EIGENVALUES: [1.0, 3.0]},
                   {"task": 1, "event": "task_start", "curvature/hessian_eps_rank": 5.0}]

    axis = WandbTaskAxis()
    trainer = _trainer([Restored(), axis], task_id=2)
    first = axis.spectrum_tables(trainer, {EIGENVALUES: torch.tensor([2.0, 0.5])})
    key = f"{EIGENVALUES}_table"
    table = first[key]
    assert table.columns == ["task", "index", "eigenvalue"] and table.log_mode == "INCREMENTAL"
    assert axis.table_rows[key] == [[0, 1, 3.0], [0, 2, 1.0], [2, 1, 2.0], [2, 2, 0.5]]
    trainer.datamodule.task_id = 3
    second = axis.spectrum_tables(trainer, {EIGENVALUES: torch.tensor([4.0])})
    assert second[key] is table  # the same incremental table: each log sends its new rows
    assert table.data[-1] == [3, 1, 4.0] and len(table.data) == 5
    assert WandbTaskAxis(spectra_tables=False).spectrum_tables(trainer, first) == {}


def test_a_wandb_failure_warns_once_and_training_goes_on() -> None:
    axis = WandbTaskAxis()
    trainer = _trainer([axis])
    logger = FakeLogger(FakeRun(fail=True))
    spectra = {"curvature/entk_eigenvalues": torch.tensor([1.0, 2.0])}
    with pytest.warns(UserWarning, match="could not send the spectra"):
        log_spectra(trainer, logger, spectra, step=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_spectra(trainer, logger, spectra, step=4)  # said once


def test_log_spectra_puts_the_task_on_the_row() -> None:
    axis = WandbTaskAxis()
    run = FakeRun()
    trainer = _trainer([axis], task_id=5)
    log_spectra(trainer, FakeLogger(run), {"features/singular_values": torch.tensor([3., 1.])},
                step=50)
    (row,) = run.logged
    assert row[TASK_AXIS] == 5 and row["trainer/global_step"] == 50
    assert type(row["features/singular_values"]).__name__ == "Histogram"
    assert row["features/singular_values_table"].columns == ["task", "index", "value"]
    # Without the callback: the histogram alone, at the global step, as before.
    run2 = FakeRun()
    log_spectra(_trainer([]), FakeLogger(run2), {"features/singular_values": torch.ones(2)}, 1)
    assert sorted(run2.logged[0]) == ["features/singular_values", "trainer/global_step"]


@pytest.mark.parametrize("rank_zero", [True, False])
def test_only_rank_zero_touches_the_logger_and_teardown_restores_it(tmp_path: Path,
                                                                    rank_zero: bool) -> None:
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)  # no run until .experiment
    axis = WandbTaskAxis()
    trainer = _trainer([axis], loggers=[logger], is_global_zero=rank_zero)
    axis.setup(trainer, None, "fit")
    assert ("log_metrics" in vars(logger)) is rank_zero
    axis.teardown(trainer, None, "fit")
    assert "log_metrics" not in vars(logger)


def test_teardown_gives_back_a_log_metrics_someone_else_installed(tmp_path: Path) -> None:
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    seen: list[dict] = []

    def theirs(metrics: dict, step: int | None = None) -> None:
        seen.append(dict(metrics))

    logger.log_metrics = theirs
    axis = WandbTaskAxis()
    trainer = _trainer([axis], loggers=[logger], task_id=2)
    axis.setup(trainer, None, "fit")
    logger._experiment = FakeRun()  # as if the run had started
    logger.log_metrics({"task/end_accuracy": 0.5}, step=3)
    assert seen == [{"task/end_accuracy": 0.5, TASK_AXIS: 2}]  # theirs, behind ours
    axis.teardown(trainer, None, "fit")
    assert vars(logger)["log_metrics"] is theirs


def test_accuracy_vs_eps_rank_rows_pair_each_task_with_its_start() -> None:
    history = [{"task": float(t), "end_accuracy": 1.0 - 0.1 * t} for t in range(3)]
    records = [
        {"task": 0, "event": "fit_start", "x": 0.9},
        {"task": 1, "event": "task_start", "x": 0.5},
        {"task": 1, "event": "task_end", "x": 0.4},  # not the task's start
        {"task": 2, "event": "task_start", "x": float("nan")},
    ]
    assert accuracy_vs_eps_rank_rows(history, records, x_key="x") == [[0, 0.9, 1.0],
                                                                       [1, 0.5, 0.9]]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prefixes": ["curvature/"]}, "no trailing"),
    ({"prefixes": [""]}, "metric prefixes"),
    ({"scatter_x": ""}, "scatter_x and scatter_y"),
])
def test_bad_arguments_say_what_to_change(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WandbTaskAxis(**kwargs)
