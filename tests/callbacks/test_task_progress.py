"""TaskProgressBar: ``task i/N`` and the last task-end accuracy in a terminal, one line per
finished task when the output is not a terminal (the recipes' progress in CI and SLURM logs)."""

from __future__ import annotations

import io
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from lightning_plasticity.callbacks import TaskProgressBar
from lightning_plasticity.callbacks.task_progress import task_line
from tests.callbacks.helpers import small_classifier, small_stream
from tests.quickstart_runs import NUM_TASKS

LINE = re.compile(r"task (\d+)/(\d+) done in [\d.]+ s: end accuracy (0\.\d{4}|1\.0000), "
                  r"online accuracy [\d.]+.* \(step (\d+), \d+:\d\d:\d\d elapsed\)")


def test_a_non_interactive_recipe_run_prints_one_line_per_task(
        quickstart_run: tuple[Path, Any]) -> None:
    # The quickstart recipe through the CLI, stdout captured (a file, not a terminal).
    _, done = quickstart_run
    lines = [line for line in done.stdout.splitlines() if line.startswith("task ")]
    assert len(lines) == NUM_TASKS, done.stdout
    matches = [LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    assert [(int(m[1]), int(m[2]), int(m[4])) for m in matches] == \
        [(t + 1, NUM_TASKS, 10 * (t + 1)) for t in range(NUM_TASKS)]
    # No bar was drawn into the log: no carriage returns, no "Epoch" bars.
    assert "\r" not in done.stdout and "Epoch" not in done.stdout


def _fit(bar: TaskProgressBar, num_tasks: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=3 * num_tasks, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         default_root_dir=tempfile.mkdtemp(), callbacks=[bar])
    trainer.fit(small_classifier(), datamodule=small_stream(num_tasks=num_tasks,
                                                            steps_per_task=3, val_size=32))
    return trainer


def test_lines_match_the_task_history() -> None:
    out = io.StringIO()
    trainer = _fit(TaskProgressBar(interactive=False, stream=out), num_tasks=3)
    lines = out.getvalue().splitlines()
    history = trainer.datamodule.task_history
    assert len(lines) == len(history) == 3
    for line, record in zip(lines, history):
        assert line.startswith(f"task {int(record['task']) + 1}/3 done")
        assert f"end accuracy {record['end_accuracy']:.4f}" in line


def test_in_a_terminal_the_bar_counts_tasks_and_shows_the_last_accuracy(
        capsys: pytest.CaptureFixture[str]) -> None:
    bar = TaskProgressBar(interactive=True)
    trainer = _fit(bar)
    out = capsys.readouterr().out
    assert "task 2/2" in out and "task 1/2" in out and "Epoch" not in out
    last = trainer.datamodule.task_history[-1]["end_accuracy"]
    assert f"end_acc={last:.3f}" in out  # the postfix at the end of the last task
    assert "done" not in out  # no lines: the bar is the progress
    assert bar.train_progress_bar.desc.startswith("task 2/2")


def test_auto_mode_follows_whether_stdout_is_a_terminal(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    bar = TaskProgressBar()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert not bar.draws_bars and not bar.is_enabled
    _fit(bar)
    out = capsys.readouterr().out
    assert [line.split(" done")[0] for line in out.splitlines()] == ["task 1/2", "task 2/2"]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert bar.draws_bars and bar.is_enabled


def test_regression_lines_show_the_loss_and_an_unfinished_target_is_left_out() -> None:
    line = task_line({"task": 4.0, "global_step": 50.0, "end_loss": 0.125,
                      "online_accuracy": float("nan"), "steps_to_target": float("nan")},
                     num_tasks=10, seconds=2.0)
    assert line == "task 5/10 done in 2.0 s: end loss 0.1250 (step 50)"


def test_a_broken_stream_never_stops_training() -> None:
    out = io.StringIO()
    out.close()
    trainer = _fit(TaskProgressBar(interactive=False, stream=out))
    assert len(trainer.datamodule.task_history) == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"interactive": "yes"}, "interactive must be True, False or None"),
    ({"refresh_rate": -1}, "refresh_rate must be an int >= 0"),
])
def test_bad_arguments_say_what_to_change(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TaskProgressBar(**kwargs)
