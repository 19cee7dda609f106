"""Run a study's cells, each an ordinary ``lightning-plasticity fit`` in its own process.

Every cell runs in its own folder (``<study_dir>/cells/<cell id>/``) as the working directory,
so a recipe's relative paths (``runs/...``: CSV and wandb logs, checkpoints) land there::

    <study_dir>/study.json                  the expanded grid
    <study_dir>/cells/<id>/cell.json        recipe, method, variant, params, seed, command
    <study_dir>/cells/<id>/status.json      {"state": "done"|"failed"|"running", ...}
    <study_dir>/cells/<id>/output.log       the run's stdout and stderr
    <study_dir>/cells/<id>/runs/...         what the recipe writes (metrics.csv, histories)

A rerun skips cells whose ``status.json`` says done with the same command, and resumes an
interrupted cell from its ``last.ckpt`` if the recipe keeps one. A failed cell is reported and
the others go on. Locally ``jobs`` processes run at once (a thread per running cell waits on
its process); ``executor="slurm"`` sends one ``submitit`` job per cell to SLURM, and
``"submitit-local"`` runs the same path on this machine (``submitit.LocalExecutor``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lightning_plasticity.core.json_file import read_json, write_json
from lightning_plasticity.study.grid import Cell, StudySpec, expand_study

__all__ = ["StudyResult", "cli_executable", "run_cell", "run_study"]

Executor = Literal["local", "submitit-local", "slurm"]


def cli_executable() -> list[str]:
    """The ``lightning-plasticity`` command of this Python environment."""
    script = Path(sys.executable).parent / "lightning-plasticity"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "lightning_plasticity.cli"]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_json(path, data, indent=1, default=str)


def _last_checkpoint(cell_dir: Path) -> Path | None:
    found = sorted((cell_dir / "runs").glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _claim(folder: Path) -> bool:
    """Take the cell's lock (``.lock``: host and pid); False while a live process holds it.

    Two runners on one study (a second ``--jobs`` process, or a local run beside a cluster
    run on a shared disk) then never run a cell twice at once; a dead holder's lock is taken
    over.
    """
    lock = folder / ".lock"
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            host, _, pid = lock.read_text().partition(" ")
            alive = True
            if host == socket.gethostname():
                try:
                    os.kill(int(pid), 0)
                except (ProcessLookupError, ValueError):
                    alive = False
                except PermissionError:
                    pass
            if alive:
                return False
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(me)
        return True
    return False


def run_cell(cell: dict[str, Any], cell_dir: str, executable: list[str],
             env: dict[str, str] | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run one cell (``cell`` as in ``cell.json``) in ``cell_dir``; return its status.

    Skips a cell another runner finished meanwhile (``"skipped": True``) or is running now
    (``state == "elsewhere"``). Module-level and on plain data, so ``submitit`` can pickle it
    to a cluster node.
    """
    folder = Path(cell_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if not _claim(folder):
        return {"state": "elsewhere", "returncode": None, "seconds": 0.0}
    try:
        status = read_json(folder / "status.json") or {}
        recorded = read_json(folder / "cell.json") or {}
        if status.get("state") == "done" and recorded.get("command") == cell["command"]:
            return {**status, "skipped": True}
        return _run_claimed(cell, folder, executable, env, timeout)
    finally:
        (folder / ".lock").unlink(missing_ok=True)


def _run_claimed(cell: dict[str, Any], folder: Path, executable: list[str],
                 env: dict[str, str] | None, timeout: float | None) -> dict[str, Any]:
    command = executable + cell["command"][1:]
    resume = _last_checkpoint(folder)
    if resume is not None:  # an interrupted cell: continue where it stopped
        command += ["--ckpt_path", str(resume)]
    run_env = {**os.environ, **(env or {})}
    run_env.setdefault("WANDB_MODE", "offline")
    run_env.setdefault("WANDB_SILENT", "true")
    start = time.time()
    _write_json(folder / "status.json", {"state": "running", "returncode": None,
                                         "seconds": 0.0, "resumed_from": str(resume or "")})
    with open(folder / "output.log", "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        try:
            returncode = subprocess.run(command, cwd=folder, env=run_env, stdout=log,
                                        stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            log.write(f"\nstudy: cell timed out after {timeout} s\n")
            returncode = -1
    status = {"state": "done" if returncode == 0 else "failed", "returncode": returncode,
              "seconds": round(time.time() - start, 3), "resumed_from": str(resume or "")}
    _write_json(folder / "status.json", status)
    return status


@dataclass
class StudyResult:
    """What a call of :func:`run_study` did."""

    study_dir: Path
    ran: list[str]
    skipped: list[str]
    failed: list[str]

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        lines = [f"study {self.study_dir}: {len(self.ran)} ran, {len(self.skipped)} already "
                 f"done, {len(self.failed)} failed"]
        for cid in self.failed:
            log = self.study_dir / "cells" / cid / "output.log"
            tail = log.read_text().strip().splitlines()[-3:] if log.is_file() else []
            lines.append(f"  FAILED {cid} (see {log})")
            lines += [f"    {t}" for t in tail]
        return "\n".join(lines)


def _prepare(cells: list[Cell], study_dir: Path) -> tuple[list[Cell], list[str]]:
    """Cells to run now and ids already done; a done cell whose command changed is moved aside."""
    todo, done = [], []
    for cell in cells:
        folder = study_dir / "cells" / cell.id
        status = read_json(folder / "status.json") or {}
        recorded = read_json(folder / "cell.json") or {}
        if recorded and recorded.get("command") != cell.to_json()["command"]:
            stale = folder.with_name(f"{cell.id}.stale-{int(time.time())}")
            shutil.move(str(folder), str(stale))  # never delete results: keep them aside
            print(f"study: {cell.id}'s command changed; old results moved to {stale}",
                  file=sys.stderr)
            status = {}
        if status.get("state") == "done":
            done.append(cell.id)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / "cell.json", cell.to_json())
        todo.append(cell)
    return todo, done


def run_study(spec: StudySpec, study_dir: str | os.PathLike | None = None, *, jobs: int = 1,
              executor: Executor = "local", extra_args: dict[str, Any] | None = None,
              executable: list[str] | None = None, cell_timeout: float | None = None,
              dry_run: bool = False, on_done: Callable[[str, dict[str, Any]], None] | None = None
              ) -> StudyResult:
    """Expand ``spec`` and run every cell not finished yet.

    Args:
        spec: the parsed study file.
        study_dir: output folder (default ``runs/studies/<name>``).
        jobs: cells at once (local executors); each gets ``cpu_count // jobs`` torch threads
            unless ``OMP_NUM_THREADS`` is set.
        executor: ``"local"``, ``"submitit-local"`` or ``"slurm"`` (needs ``submitit``:
            ``pip install lightning-plasticity[cluster]``); the study file's ``slurm:``
            mapping goes to ``executor.update_parameters``.
        extra_args: more overrides for every cell (after the study's ``args``).
        executable: the CLI command (default: this environment's ``lightning-plasticity``).
        cell_timeout: seconds after which a local cell is killed and counted as failed.
        dry_run: write ``study.json`` and the cell files, run nothing.
        on_done: called with ``(cell id, status)`` as each cell finishes.
    """
    if jobs < 1:
        raise ValueError(f"study: jobs must be >= 1, got {jobs}.")
    if executor not in ("local", "submitit-local", "slurm"):
        raise ValueError(f"study: executor must be local, submitit-local or slurm, got "
                         f"{executor!r}.")
    study_dir = Path(study_dir or Path("runs") / "studies" / spec.name).resolve()
    cells = expand_study(spec, extra_args)
    study_dir.mkdir(parents=True, exist_ok=True)
    _write_json(study_dir / "study.json", {"name": spec.name, "study_file": str(spec.path),
                                           "report": spec.report,
                                           "cells": [c.to_json() for c in cells]})
    todo, done = _prepare(cells, study_dir)
    result = StudyResult(study_dir, [], done, [])
    if dry_run or not todo:
        return result
    executable = executable or cli_executable()
    env = {}
    if "OMP_NUM_THREADS" not in os.environ and executor != "slurm":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))

    def finished(cell: Cell, status: dict[str, Any]) -> None:
        if status.get("skipped") or status["state"] == "elsewhere":
            result.skipped.append(cell.id)
            print(f"study: {cell.id}: done or running in another runner", file=sys.stderr,
                  flush=True)
            return
        (result.ran if status["state"] == "done" else result.failed).append(cell.id)
        print(f"study: {cell.id}: {status['state']} in {status['seconds']:.0f} s",
              file=sys.stderr, flush=True)
        if on_done is not None:
            on_done(cell.id, status)

    if executor == "local":
        def one(cell: Cell) -> None:
            try:
                status = run_cell(cell.to_json(), str(study_dir / "cells" / cell.id),
                                  executable, env, cell_timeout)
            except Exception as err:  # noqa: BLE001 (a broken cell must not stop the others)
                status = {"state": "failed", "returncode": None, "seconds": 0.0,
                          "error": repr(err)}
                _write_json(study_dir / "cells" / cell.id / "status.json", status)
            finished(cell, status)

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(one, todo))
        return result

    try:
        import submitit
    except ImportError as err:
        raise ImportError(f"study: executor={executor!r} needs submitit: pip install "
                          "'lightning-plasticity[cluster]' (or pip install submitit).") from err
    folder = study_dir / "submitit"
    if executor == "slurm":
        runner = submitit.AutoExecutor(folder=folder, cluster="slurm")
        runner.update_parameters(**spec.slurm)
    else:
        runner = submitit.LocalExecutor(folder=folder)
        runner.update_parameters(timeout_min=int((cell_timeout or 24 * 3600) // 60) + 1)
    submitted = [(cell, runner.submit(run_cell, cell.to_json(),
                                      str(study_dir / "cells" / cell.id), executable, env,
                                      cell_timeout))
                 for cell in todo]
    for cell, job in submitted:
        try:
            status = job.result()
        except Exception as err:  # noqa: BLE001 (the job itself failed: report, go on)
            status = {"state": "failed", "returncode": None, "seconds": 0.0,
                      "error": repr(err)}
            _write_json(study_dir / "cells" / cell.id / "status.json", status)
        finished(cell, status)
    return result
