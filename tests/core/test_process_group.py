"""The default process group is destroyed before the interpreter exits, on gloo too."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from lightning_plasticity.callbacks import TaskMetricsPlot, UnitActivityCallback
from lightning_plasticity.core import process_group
from lightning_plasticity.interventions import ShrinkAndPerturb

SCRIPT = """
import atexit, tempfile, torch.distributed as dist
from lightning_plasticity.core.process_group import destroy_process_group_at_exit
# registered first, so it runs last (atexit is LIFO): sees whether ours destroyed the group
atexit.register(lambda: print("initialized at exit:", dist.is_initialized()))
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0,
                        world_size=1)
destroy_process_group_at_exit()
destroy_process_group_at_exit()  # twice: registered once
"""


def test_group_is_destroyed_at_exit() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "initialized at exit: False"


@pytest.mark.parametrize("world_size, registers", [(1, False), (2, True)])
@pytest.mark.parametrize("callback", [UnitActivityCallback(), TaskMetricsPlot(),
                                      ShrinkAndPerturb()], ids=["measurement", "figure",
                                                                "intervention"])
def test_package_callbacks_register_under_ddp(monkeypatch: pytest.MonkeyPatch, callback: object,
                                              world_size: int, registers: bool) -> None:
    registered = []
    monkeypatch.setattr(process_group, "_registered", False)
    monkeypatch.setattr(process_group.atexit, "register", registered.append)
    callback.setup(SimpleNamespace(world_size=world_size), None, "fit")  # type: ignore[attr-defined]
    assert registered == ([process_group._destroy] if registers else [])
