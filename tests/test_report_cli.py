"""``lightning-plasticity report RUN_DIR`` redraws a run's figures from its ``metrics.csv`` and
``histories.json`` (the recipes' ``HistoryWriter``): of a finished run, and of one killed mid-way
(SIGKILL: no clean-up at all), which keeps the pictures of its finished tasks."""

from __future__ import annotations

import shutil
import signal
import struct
from pathlib import Path
from typing import Any

import pytest

from lightning_plasticity.study.collect import load_study
from tests.quickstart_runs import NUM_TASKS, STEPS_PER_TASK, run_cli, run_quickstart

FIGURES = ["task_end_accuracy.png", "eps_rank.png", "accuracy_vs_eps_rank.png", "spectra.png"]


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG (its IHDR chunk); fails on anything else."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    assert len(data) > 5000, f"{path} is nearly empty ({len(data)} bytes)"
    return struct.unpack(">II", data[16:24])


def _report(folder: Path, out: Path) -> Path:
    done = run_cli(folder, "report", "runs/quickstart", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.strip().splitlines()[-1]) == out / "report.md"
    for name in FIGURES:
        width, height = _png_size(out / name)
        assert width > 300 and height > 200, name
    return out / "report.md"


def test_report_of_a_finished_run(quickstart_run: tuple[Path, Any], tmp_path: Path) -> None:
    folder, _ = quickstart_run
    run_dir = folder / "runs" / "quickstart" / "version_0"
    assert (run_dir / "histories.json").is_file()  # the recipe's HistoryWriter
    report = _report(folder, tmp_path / "report").read_text()
    assert f"n = {NUM_TASKS} cell-tasks" in report  # every task in the scatter plot
    for name in FIGURES:
        assert f"]({name})" in report


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small quickstart SIGKILLed in the middle of its last task."""
    folder = tmp_path_factory.mktemp("killed")
    kill_after = 2 * STEPS_PER_TASK + STEPS_PER_TASK // 2
    killed = run_quickstart(folder, "--trainer.callbacks+=tests.fault_helpers.KillAtStep",
                            f"--trainer.callbacks.step={kill_after}")
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed.stderr[-3000:]
    return folder


def test_report_of_a_run_killed_mid_way(killed_run: Path, tmp_path: Path) -> None:
    # The run left what its finished tasks wrote, and no figure of its own.
    run_dir = killed_run / "runs" / "quickstart" / "version_0"
    assert (run_dir / "histories.json").is_file()
    assert not (run_dir / "task_end_accuracy.png").exists()
    run = load_study(killed_run / "runs" / "quickstart").cells[0].run
    assert run is not None and sorted(run.tasks) == [0, 1]

    report = _report(killed_run, tmp_path / "report").read_text()
    assert "Spearman's rho: not available" in report  # two finished tasks are too few
    assert "1 run(s) with metrics (quickstart: 2 tasks)" in report  # not "finished"


def test_report_of_a_killed_run_without_histories(killed_run: Path, tmp_path: Path) -> None:
    # A recipe without HistoryWriter: metrics.csv alone still gives the task-end accuracy
    # (measurements are read from histories.json only).
    shutil.copytree(killed_run / "runs", tmp_path / "runs")
    (tmp_path / "runs" / "quickstart" / "version_0" / "histories.json").unlink()
    done = run_cli(tmp_path, "report", "runs/quickstart", "--out", "report")
    assert done.returncode == 0, done.stderr[-3000:]
    _png_size(tmp_path / "report" / "task_end_accuracy.png")
    run = load_study(tmp_path / "runs" / "quickstart").cells[0].run
    assert run is not None and not run.has_histories and sorted(run.tasks) == [0, 1]
