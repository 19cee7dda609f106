"""The ``lightning-plasticity`` CLI: --help, --print_config and the quickstart recipe."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_plasticity.cli import run_cli
from tests.conftest import REPO


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["--help"])
    assert exit_info.value.code == 0
    assert "fit" in capsys.readouterr().out


def test_print_config_resolves_short_class_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--print_config"])
    out = capsys.readouterr().out
    assert "class_path: lightning_plasticity.models.ContinualClassifier" in out
    assert "class_path: lightning_plasticity.models.MLP" in out
    assert "class_path: lightning_plasticity.data.ContinualDataModule" in out
    assert "class_path: lightning_plasticity.callbacks.TaskMetricsPlot" in out


@pytest.mark.parametrize("recipe", ["l2_init", "diagnostics"])
def test_other_recipes_resolve(recipe: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(REPO / "recipes" / f"{recipe}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "lightning_plasticity.data.ContinualDataModule" in out
    if recipe == "diagnostics":
        for name in ("HessianRankCallback", "PlasticityProbeCallback", "MeasurementsPlot"):
            assert f"class_path: lightning_plasticity.callbacks.{name}" in out


def test_quickstart_recipe_runs_and_writes_its_plot(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("lightning-plasticity")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [str(script), "fit", "--config", str(REPO / "recipes" / "quickstart.yaml"),
           "--data.init_args.num_tasks", "3", "--data.init_args.steps_per_task", "15",
           ]
    # The recipe's paths are relative ("runs/..."), so running in tmp_path keeps the repo clean.
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    png = run_dir / "task_end_accuracy.png"
    assert png.stat().st_size > 5000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    ends = [r["task/end_accuracy"] for r in rows if r.get("task/end_accuracy")]
    assert len(ends) == 3
    assert (run_dir / "config.yaml").exists()
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*")), "wandb offline run missing"


@pytest.mark.parametrize(("override", "message"), [
    (["--data.init_args.num_tasks", "0"], "num_tasks must be >= 1, got 0"),
    (["--data.init_args.task", "shuffled"], "Unknown task kind 'shuffled'"),
    (["--model.init_args.lr", "-1"], "Need lr > 0"),
])
def test_the_package_message_comes_first(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str], override: list,
                                         message: str) -> None:
    from lightning_plasticity.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning-plasticity", "fit", "--config",
                                      str(REPO / "recipes" / "quickstart.yaml"), *override])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-plasticity: error:") and message in err
    assert "Union subtypes" not in err


def test_ckpt_path_last_resumes_a_recipe_run(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The recipes checkpoint into runs/<name>/checkpoints (every 100 steps, a task of the
    # quickstart), so `--ckpt_path last` finds the run and continues it with more tasks.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    base = ["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"),
            "--trainer.logger", "false", "--data.init_args.steps_per_task", "100"]
    first = run_cli([*base, "--data.init_args.num_tasks", "2"])
    assert (tmp_path / "runs" / "quickstart" / "checkpoints" / "last.ckpt").is_file()
    resumed = run_cli([*base, "--data.init_args.num_tasks", "3", "--ckpt_path", "last"])
    assert first.trainer.global_step == 200 and resumed.trainer.global_step == 300
    history = resumed.datamodule.task_history
    assert [int(h["task"]) for h in history] == [0, 1, 2]


def test_a_class_name_typo_in_a_recipe_suggests_the_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = (REPO / "recipes" / "quickstart.yaml").read_text()
    typo = tmp_path / "typo.yaml"
    typo.write_text(recipe.replace("class_path: ContinualClassifier",
                                   "class_path: ContinualClasifier"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(typo)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown class 'ContinualClasifier'; did you mean 'ContinualClassifier'?" in err
