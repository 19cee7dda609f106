"""Kill a CLI run with SIGKILL, resume it with ``--ckpt_path last``, compare with an
uninterrupted run: task history, callback histories and final weights are identical.

The recipe checkpoints every 4 optimizer steps into ``runs/quickstart/checkpoints/last.ckpt``;
tasks are 8 steps. Lightning runs checkpoint callbacks last, so a kill after step 10 leaves the
checkpoint of step 8 (exactly at a task boundary) and a kill after step 14 that of step 12
(mid-task).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.callbacks.helpers import without_timing

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "lightning-plasticity"
STEPS_PER_TASK, NUM_TASKS, EVERY = 8, 3, 4


def _config(folder: Path) -> Path:
    config = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    config["trainer"]["logger"] = False
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"] == "ModelCheckpoint":
            cb["init_args"]["every_n_train_steps"] = EVERY
    config["trainer"]["callbacks"].append(
        {"class_path": "UnitActivityCallback", "init_args": {"probe_size": 64,
                                                             "on_task_end": True}})
    config["data"]["init_args"].update(num_tasks=NUM_TASKS, steps_per_task=STEPS_PER_TASK)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    folder.mkdir(exist_ok=True)
    command = ["timeout", "-k", "10", "300", str(CLI), "fit", "--config",
               str(_config(folder)), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)


def _final(folder: Path) -> dict:
    return torch.load(folder / "runs" / "quickstart" / "checkpoints" / "last.ckpt",
                      weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("uninterrupted")
    done = _run(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return _final(folder)


@pytest.mark.parametrize(("kill_after", "checkpoint"), [(10, 8), (14, 12)],
                         ids=["checkpoint_at_boundary", "checkpoint_mid_task"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path: Path, uninterrupted: dict,
                                                         kill_after: int,
                                                         checkpoint: int) -> None:
    killed = _run(tmp_path, "--trainer.callbacks+=tests.fault_helpers.KillAtStep",
                  f"--trainer.callbacks.step={kill_after}")
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed.stderr[-3000:]
    assert _final(tmp_path)["global_step"] == checkpoint

    resumed = _run(tmp_path, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = _final(tmp_path)
    assert final["global_step"] == uninterrupted["global_step"] == NUM_TASKS * STEPS_PER_TASK
    dm_key = "ContinualDataModule"
    assert repr(final[dm_key]["task_history"]) == repr(uninterrupted[dm_key]["task_history"])
    mine = {k: v for k, v in final["callbacks"].items() if "UnitActivity" in k}
    theirs = {k: v for k, v in uninterrupted["callbacks"].items() if "UnitActivity" in k}
    assert repr(without_timing(mine)) == repr(without_timing(theirs))
    for name, value in uninterrupted["state_dict"].items():
        assert torch.equal(final["state_dict"][name], value), name
