"""The study runner: cells in their own folders, reruns skip finished cells, failures go on.

A stand-in for ``lightning-plasticity`` (a short Python script) keeps these tests fast; the
recipes themselves run through the real CLI in ``tests/test_reproduce_recipes.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_plasticity.study import load_study_spec, run_cell, run_study

# Writes what a recipe writes (runs/<name>/version_0/metrics.csv), records its arguments, and
# fails for seed 1 unless the file `heal` exists next to the study.
FAKE_CLI = """
import json, pathlib, sys
args = sys.argv[1:]
seed = args[args.index("--seed_everything") + 1]
here = pathlib.Path.cwd()
calls = here / "calls.txt"
calls.write_text((calls.read_text() if calls.exists() else "") + " ".join(args) + "\\n")
if seed == "1" and not (here.parents[1] / "heal").exists():
    print("boom: cannot train seed 1", file=sys.stderr)
    sys.exit(3)
run = here / "runs" / "fake" / "version_0"
run.mkdir(parents=True, exist_ok=True)
(run / "metrics.csv").write_text("step,task/end_accuracy\\n9,0.5\\n")
"""


@pytest.fixture
def study(tmp_path: Path) -> Path:
    (tmp_path / "recipe.yaml").write_text("seed_everything: 0\n")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "name": "fake", "recipes": {"r": "recipe.yaml"},
        "methods": {"plain": {}, "l2": {"model.init_args.l2_coef": [0.1, 1.0]}},
        "seeds": [0, 1]}, sort_keys=False))
    (tmp_path / "fake_cli.py").write_text(FAKE_CLI)
    return path


def fake(study: Path) -> list[str]:
    return [sys.executable, str(study.parent / "fake_cli.py")]


def test_failed_cells_are_reported_and_the_rest_go_on(study: Path) -> None:
    out = study.parent / "out"
    result = run_study(load_study_spec(study), out, jobs=2, executable=fake(study))
    assert sorted(result.ran) == ["r__l2__l2_coef=0.1__seed0", "r__l2__l2_coef=1.0__seed0",
                                  "r__plain__default__seed0"]
    assert sorted(result.failed) == ["r__l2__l2_coef=0.1__seed1", "r__l2__l2_coef=1.0__seed1",
                                     "r__plain__default__seed1"]
    assert not result.ok and "boom: cannot train seed 1" in result.summary()
    cell = out / "cells" / "r__l2__l2_coef=1.0__seed0"
    assert (cell / "runs" / "fake" / "version_0" / "metrics.csv").is_file()
    assert json.loads((cell / "status.json").read_text())["state"] == "done"
    recorded = json.loads((cell / "cell.json").read_text())
    assert recorded["seed"] == 0 and recorded["params"] == {"model.init_args.l2_coef": 1.0}
    assert "--model.init_args.l2_coef 1.0" in (cell / "calls.txt").read_text()
    grid = json.loads((out / "study.json").read_text())
    assert len(grid["cells"]) == 6


def test_a_rerun_skips_finished_cells_and_retries_failed_ones(study: Path) -> None:
    out = study.parent / "out"
    run_study(load_study_spec(study), out, executable=fake(study))
    (out / "heal").write_text("")
    again = run_study(load_study_spec(study), out, executable=fake(study))
    assert len(again.skipped) == 3 and len(again.ran) == 3 and again.ok
    done = out / "cells" / "r__plain__default__seed0" / "calls.txt"
    assert len(done.read_text().splitlines()) == 1  # not run twice
    retried = out / "cells" / "r__plain__default__seed1" / "calls.txt"
    assert len(retried.read_text().splitlines()) == 2
    assert run_study(load_study_spec(study), out, executable=fake(study)).ran == []


def test_an_interrupted_cell_resumes_from_its_last_checkpoint(study: Path) -> None:
    out = study.parent / "out"
    run_study(load_study_spec(study), out, dry_run=True)
    cell = out / "cells" / "r__plain__default__seed0"
    checkpoint = cell / "runs" / "fake" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    run_study(load_study_spec(study), out, executable=fake(study))
    assert f"--ckpt_path {checkpoint}" in (cell / "calls.txt").read_text()


def test_a_changed_command_keeps_the_old_results_aside(study: Path) -> None:
    out = study.parent / "out"
    run_study(load_study_spec(study), out, executable=fake(study))
    result = run_study(load_study_spec(study), out, executable=fake(study),
                       extra_args={"data.init_args.num_tasks": 2})
    assert len(result.ran) == 3 and not result.skipped
    assert len(list((out / "cells").glob("r__plain__default__seed0.stale-*"))) == 1


def test_submitit_local_executor(study: Path) -> None:
    import submitit  # noqa: F401  (in the dev extra)
    out = study.parent / "out"
    result = run_study(load_study_spec(study), out, executor="submitit-local",
                       executable=fake(study))
    assert len(result.ran) == 3 and len(result.failed) == 3
    assert (out / "submitit").is_dir()


def test_the_cli_runs_a_study_and_exits_nonzero_on_failures(study: Path) -> None:
    # --dry-run through the real console entry point, then bad input with our own message.
    cli = Path(sys.executable).parent / "lightning-plasticity"
    done = subprocess.run([str(cli), "study", "--config", str(study), "--out",
                           str(study.parent / "out"), "--dry-run"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (study.parent / "out" / "cells" / "r__plain__default__seed1" / "cell.json").is_file()
    bad = subprocess.run([str(cli), "study", "--config", str(study.parent / "nope.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no study file" in bad.stderr


def test_bad_arguments(study: Path) -> None:
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        run_study(load_study_spec(study), study.parent / "out", jobs=0)
    with pytest.raises(ValueError, match="executor must be"):
        run_study(load_study_spec(study), study.parent / "out", executor="pbs")  # type: ignore


def test_two_runners_never_run_a_cell_twice(study: Path) -> None:
    # A live process holds the lock of one cell (another runner), a dead one the lock of another.
    out = study.parent / "out"
    run_study(load_study_spec(study), out, dry_run=True)
    busy = out / "cells" / "r__plain__default__seed0"
    stale = out / "cells" / "r__plain__default__seed1"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        import socket

        (busy / ".lock").write_text(f"{socket.gethostname()} {holder.pid}")
        (stale / ".lock").write_text(f"{socket.gethostname()} {dead.pid}")
        (out / "heal").write_text("")
        result = run_study(load_study_spec(study), out, executable=fake(study))
    finally:
        holder.kill()
    assert "r__plain__default__seed0" in result.skipped  # running elsewhere
    assert not (busy / "calls.txt").exists()
    assert "r__plain__default__seed1" in result.ran  # the stale lock was taken over
    assert not (stale / ".lock").exists()


def test_a_cell_finished_by_another_runner_meanwhile_is_skipped(study: Path) -> None:
    out = study.parent / "out"
    (study.parent / "out").mkdir()
    first = run_study(load_study_spec(study), out, executable=fake(study))
    assert first.ran
    cell = next(iter(first.ran))
    spec = json.loads((out / "cells" / cell / "cell.json").read_text())
    status = run_cell(spec, str(out / "cells" / cell), fake(study))
    assert status.get("skipped") and status["state"] == "done"
    assert len((out / "cells" / cell / "calls.txt").read_text().splitlines()) == 1
