"""The quickstart recipe run through the real CLI in a subprocess, small and fast: the shared
subject of the wandb, progress and report tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "lightning-plasticity"
NUM_TASKS, STEPS_PER_TASK = 3, 10

#: 3 tasks of 10 steps, a width-16 MLP (a Hessian of 1,482 parameters, measured exactly) and a
#: HessianRankCallback at every task start, so that the spectra and the eps-rank exist.
QUICKSTART_ARGS = [
    "fit", "--config", str(REPO / "recipes" / "quickstart.yaml"),
    "--data.init_args.num_tasks", str(NUM_TASKS),
    "--data.init_args.steps_per_task", str(STEPS_PER_TASK),
    "--model.init_args.network.init_args.width", "16",
    "--trainer.callbacks+=HessianRankCallback", "--trainer.callbacks.max_overhead=null",
    "--trainer.callbacks.probe_size=64",
]


def cli_env() -> dict[str, str]:
    """Offline wandb, one thread, and ``tests`` importable (for ``tests.fault_helpers``)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WANDB_DIR", None)
    return env


def run_cli(folder: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``lightning-plasticity *args`` in ``folder`` (the recipes' paths are relative to it)."""
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run([str(CLI), *args], cwd=folder, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


def run_quickstart(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    """The small quickstart (:data:`QUICKSTART_ARGS`) in ``folder``, plus ``extra`` arguments."""
    return run_cli(folder, *QUICKSTART_ARGS, *extra)
