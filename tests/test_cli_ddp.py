"""Every recipe under DDP with 2 CPU processes, launched as users launch it: through the CLI.

Each run is a subprocess under ``timeout -k``, so a deadlock (a collective called from one rank)
fails the test instead of hanging CI. It must exit 0 and write all its figures.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "lightning-plasticity"
FIGURES = {
    "quickstart": ["task_end_accuracy.png"],
    "l2_init": ["task_end_accuracy.png"],
    "diagnostics": ["task_end_accuracy.png", "measurements.png"],
}


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
@pytest.mark.parametrize("recipe", sorted(FIGURES))
def test_recipe_runs_under_ddp_through_the_cli(tmp_path: Path, recipe: str,
                                               strategy: str) -> None:
    command = [
        "timeout", "-k", "10", "240", str(CLI), "fit",
        "--config", str(REPO / "recipes" / f"{recipe}.yaml"),
        "--trainer.strategy", strategy, "--trainer.devices", "2",
        "--trainer.accelerator", "cpu",
        "--data.init_args.num_tasks", "2", "--data.init_args.steps_per_task", "8",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, (f"exit {done.returncode} (124/137: timed out, a deadlock?)\n"
                                  f"{done.stderr[-4000:]}")
    run_dir = tmp_path / "runs" / recipe / "version_0"
    for figure in FIGURES[recipe]:
        assert (run_dir / figure).is_file(), f"{figure} missing; stderr:\n{done.stderr[-2000:]}"
    assert "skipped the measurement" not in done.stderr, done.stderr[-4000:]
