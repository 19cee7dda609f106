"""HistoryWriter: the task history and every measurement history in one JSON file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_plasticity.callbacks import (
    HessianRankCallback,
    HistoryWriter,
    UnitActivityCallback,
)
from lightning_plasticity.callbacks.history_writer import to_json
from tests.callbacks.helpers import small_classifier, small_stream
from tests.data.helpers import fast_trainer


def test_writes_tasks_and_measurements_into_the_log_dir(tmp_path: Path) -> None:
    units = UnitActivityCallback(probe_size=32)
    hessian = HessianRankCallback(max_overhead=None, num_matvecs=300, probe_size=32)
    writer = HistoryWriter()
    dm = small_stream(num_tasks=2, val_size=32)
    trainer = fast_trainer(callbacks=[units, hessian, writer], limit_val_batches=0,
                           logger=CSVLogger(tmp_path, name="run"))
    trainer.fit(small_classifier(), datamodule=dm)

    path = tmp_path / "run" / "version_0" / "histories.json"
    assert writer.last_path == path
    saved = json.loads(path.read_text())
    assert [int(t["task"]) for t in saved["tasks"]] == [0, 1]
    assert [t["end_accuracy"] for t in saved["tasks"]] == \
        pytest.approx([t["end_accuracy"] for t in dm.task_history])
    assert set(saved["measurements"]) == {"UnitActivityCallback", "HessianRankCallback"}
    records = saved["measurements"]["HessianRankCallback"]
    assert [(r["task"], r["event"]) for r in records] == [(0, "task_start"), (1, "task_start")]
    assert [r["curvature/hessian_eps_rank"] for r in records] == \
        [h["curvature/hessian_eps_rank"] for h in hessian.history]
    assert records[0]["curvature/hessian_eps_rank"] > 0
    assert records[0]["curvature/hessian_top_eigenvalues"] == \
        pytest.approx(hessian.history[0]["curvature/hessian_top_eigenvalues"])
    assert len(saved["measurements"]["UnitActivityCallback"]) == len(units.history) > 0
    assert not list(path.parent.glob(".histories.json.*"))  # no temporary file left


def test_rewritten_at_each_task_end(tmp_path: Path) -> None:
    """An interrupted run keeps the histories of the tasks it finished."""
    seen: list[int] = []

    class Reader(HistoryWriter):
        def on_task_end(self, trainer, pl_module, task_id):  # noqa: ANN001, ANN201
            super().on_task_end(trainer, pl_module, task_id)
            seen.append(len(json.loads(self.last_path.read_text())["tasks"]))

    fast_trainer(callbacks=[UnitActivityCallback(probe_size=16), Reader(dirpath=tmp_path)],
                 limit_val_batches=0).fit(small_classifier(),
                                          datamodule=small_stream(num_tasks=3, steps_per_task=2))
    assert seen == [1, 2, 3]


def test_same_class_twice_gets_suffixes(tmp_path: Path) -> None:
    callbacks = [UnitActivityCallback(probe_size=16), UnitActivityCallback(probe_size=8),
                 HistoryWriter("h.json", dirpath=tmp_path)]
    fast_trainer(callbacks=callbacks, limit_val_batches=0).fit(
        small_classifier(), datamodule=small_stream(num_tasks=1, steps_per_task=2))
    saved = json.loads((tmp_path / "h.json").read_text())
    assert set(saved["measurements"]) == {"UnitActivityCallback", "UnitActivityCallback_1"}


def test_json_conversion() -> None:
    converted = to_json({"a": torch.tensor([1.0, float("nan")]), "b": float("inf"),
                         "c": (1, "x", None), "d": torch.tensor(2.5)})
    assert converted == {"a": [1.0, None], "b": None, "c": [1, "x", None], "d": 2.5}
    json.dumps(converted, allow_nan=False)


@pytest.mark.parametrize("filename", ["histories.csv", "runs/histories.json", ""])
def test_bad_filename(filename: str) -> None:
    with pytest.raises(ValueError, match="ending in .json"):
        HistoryWriter(filename)
