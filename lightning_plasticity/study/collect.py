"""Collect runs (``metrics.csv`` and ``histories.json``) into per-task tables, and aggregate them.

Pure: no Lightning, no pandas. Reads either a study folder (``study.json`` and one folder per
cell, as :mod:`.runner` writes it)::

    <study>/study.json                                   {"name", "cells": [cell, ...]}
    <study>/cells/<id>/cell.json                         {"id", "recipe", "method", "variant",
                                                          "params", "seed", "command", ...}
    <study>/cells/<id>/status.json                       {"state", "returncode", "seconds"}
    <study>/cells/<id>/runs/<name>/version_<k>/metrics.csv     (Lightning's CSVLogger)
    <study>/cells/<id>/runs/<name>/version_<k>/histories.json  (HistoryWriter)

or any folder with Lightning runs below it (each run a cell: recipe = the CSV logger's name,
method ``"run"``, variant ``"default"``). A resumed run's ``version_<k>`` folders are merged, later
versions winning for the same task (and measurement step).

Per task, a run has its end metrics (``end_accuracy``, ``end_loss``, ``online_accuracy``, ... from
``histories.json``'s ``tasks`` or, without it, from the ``task/*`` rows of ``metrics.csv``) and
every numeric measurement of the measurement callbacks' histories, per event (``task_start``,
``task_end``, ...). :meth:`Run.table` puts them in one row per task, with the eps-rank at the
task's start (``eps_rank``, ``num_params``, ``normalized_eps_rank``) in front.
"""

from __future__ import annotations

import csv
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lightning_plasticity.core.json_file import read_json

__all__ = [
    "CellResult",
    "Correlation",
    "GroupSummary",
    "Run",
    "SeedStats",
    "Study",
    "best_variants",
    "eps_rank_correlation",
    "load_run",
    "load_study",
    "score_key",
    "seed_stats",
    "summarize",
    "task_series",
    "window_mean",
    "window_stats",
]

EPS_RANK = "curvature/hessian_eps_rank"
NUM_PARAMS = "curvature/hessian_num_params"
EPS_RANK_NORMALIZED = "curvature/hessian_eps_rank_normalized"
#: the event whose measurement a task's row shows first: the seeds' measurement point
START_EVENTS = ("task_start", "fit_start")
#: the order in which :func:`task_series` looks for a measurement of a task
EVENT_PREFERENCE = ("task_start", "task_end", "epoch_end", "step")
_VERSION = re.compile(r"version_(\d+)")
#: ``metrics.csv`` columns of training steps and validation, not of a task's end
_STEP_COLUMNS = {"task/id", "task/train_accuracy", "task/train_loss"}


def _float(value: Any) -> float:
    """A CSV cell or JSON value as a float (NaN for empty, null or text)."""
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _top_level_scalars(path: Path) -> dict[str, str]:
    """``key: value`` lines at the top level of a YAML file (``hparams.yaml``, ``config.yaml``):
    enough for the seed and the task layout, and robust to the Python tags that Lightning may
    write, which a safe YAML loader rejects."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    found: dict[str, str] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"([A-Za-z_][\w.]*):\s*([^\s#][^#]*?)\s*", line)
        if m:
            found.setdefault(m.group(1), m.group(2).strip("'\""))
    return found


@dataclass
class Run:
    """One training run (its ``version_<k>`` folders merged).

    Attributes:
        path: the run folder (the CSV logger's ``<name>`` folder, or a single version folder).
        name: the CSV logger's name (the folder above the versions).
        versions: the version folders read, oldest first.
        hparams: top-level scalars of the last ``hparams.yaml`` (and ``config.yaml``), as text.
        tasks: per task, its end metrics (``end_accuracy``, ``end_loss``, ...).
        measurements: ``event -> task -> metric name -> value`` (the last one of the task).
        spectra: ``event -> task -> spectrum name -> values`` (e.g.
            ``curvature/hessian_top_eigenvalues``).
        records: the measurement records, merged over versions, each with a ``callback`` key.
        has_histories: whether any version had a ``histories.json``.
    """

    path: Path
    name: str
    versions: list[Path]
    hparams: dict[str, str] = field(default_factory=dict)
    tasks: dict[int, dict[str, float]] = field(default_factory=dict)
    measurements: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    spectra: dict[str, dict[int, dict[str, list[float]]]] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    has_histories: bool = False

    @property
    def seed(self) -> int:
        """The run's seed from its ``hparams.yaml`` (``seed``) or ``config.yaml``
        (``seed_everything``); 0 when neither says."""
        for key in ("seed", "seed_everything"):
            try:
                return int(self.hparams[key])
            except (KeyError, ValueError):
                continue
        return 0

    def task_ids(self) -> list[int]:
        """Every task with an end metric or a measurement, in order."""
        ids = set(self.tasks)
        for per_task in self.measurements.values():
            ids.update(per_task)
        return sorted(ids)

    def measurement(self, name: str, task: int, event: str | None = None) -> float:
        """``name`` measured in ``task`` at ``event`` (default: the task's start, else its end,
        else any other event); NaN if not measured. At task 0, ``fit_start`` counts as its
        start (a run without task events)."""
        events = EVENT_PREFERENCE if event is None else (event,)
        for ev in events:
            candidates = [ev, "fit_start"] if ev == "task_start" and task == 0 else [ev]
            for e in candidates:
                value = self.measurements.get(e, {}).get(task, {}).get(name)
                if value is not None:
                    return value
        return math.nan

    def table(self) -> list[dict[str, float]]:
        """One row per task: ``task``, the end metrics, ``eps_rank``, ``num_params``,
        ``normalized_eps_rank`` (at the task's start), then every measurement as
        ``"<name>@<event>"``."""
        rows = []
        for task in self.task_ids():
            row: dict[str, float] = {"task": task, "end_accuracy": math.nan,
                                     "end_loss": math.nan}
            row.update(self.tasks.get(task, {}))
            eps = self.measurement(EPS_RANK, task, "task_start")
            params = self.measurement(NUM_PARAMS, task, "task_start")
            norm = eps / params if params and math.isfinite(params) and params > 0 else \
                self.measurement(EPS_RANK_NORMALIZED, task, "task_start")
            row.update(eps_rank=eps, num_params=params, normalized_eps_rank=norm)
            for event, per_task in self.measurements.items():
                for name, value in per_task.get(task, {}).items():
                    row[f"{name}@{event}"] = value
            rows.append(row)
        return rows


@dataclass
class CellResult:
    """One cell of a study (or one run of a folder of runs) and what it left.

    Attributes:
        id: the cell's id (for a plain run: its folder relative to the collected one).
        recipe, method, variant, seed, params: the cell's coordinates.
        state: ``"done"``, ``"failed"``, ``"running"`` or ``"missing"`` (never started, or done
            without any metrics).
        path: the cell's folder.
        run: its merged run, or None where it left no metrics.
        returncode, seconds: from ``status.json``.
        error: why the cell has no usable run, if so.
    """

    id: str
    recipe: str
    method: str
    variant: str
    seed: int
    state: str
    path: Path
    run: Run | None = field(default=None, repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    returncode: int | None = None
    seconds: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the cell finished and left metrics (only these enter the aggregates)."""
        return self.state == "done" and self.run is not None


@dataclass
class Study:
    """A collected study: its cells in the order of ``study.json`` (or of the folders)."""

    path: Path
    name: str
    cells: list[CellResult]
    #: whether ``path`` held a ``study.json`` (else a folder of plain runs)
    is_study: bool = True

    def recipes(self) -> list[str]:
        """The recipes, in order of first appearance."""
        return list(dict.fromkeys(c.recipe for c in self.cells))

    def groups(self, recipe: str) -> dict[tuple[str, str], list[CellResult]]:
        """``(method, variant) -> cells`` of ``recipe`` (every state), in order of appearance."""
        groups: dict[tuple[str, str], list[CellResult]] = {}
        for cell in self.cells:
            if cell.recipe == recipe:
                groups.setdefault((cell.method, cell.variant), []).append(cell)
        return groups

    def done(self, recipe: str | None = None) -> list[CellResult]:
        """The finished cells with metrics (of ``recipe``, if given)."""
        return [c for c in self.cells if c.ok and (recipe is None or c.recipe == recipe)]

    def problems(self) -> list[CellResult]:
        """The cells that failed, are unfinished or left no metrics."""
        return [c for c in self.cells if not c.ok]


# ---------------------------------------------------------------------------- reading a run
def _is_version(folder: Path) -> bool:
    return _VERSION.fullmatch(folder.name) is not None


def _has_run_files(folder: Path) -> bool:
    return (folder / "metrics.csv").is_file() or (folder / "histories.json").is_file()


def _version_folders(run_dir: Path) -> list[Path]:
    if _has_run_files(run_dir):
        return [run_dir]
    found = [p for p in run_dir.iterdir() if p.is_dir() and _is_version(p) and _has_run_files(p)]
    return sorted(found, key=lambda p: int(_VERSION.fullmatch(p.name).group(1)))  # type: ignore[union-attr]


def _run_dirs(root: Path) -> list[Path]:
    """The run folders below ``root``: the parent of ``version_<k>`` folders, or the folder of
    a ``metrics.csv``/``histories.json`` that is not in a version folder."""
    found: dict[Path, None] = {}
    files = sorted({p.parent for name in ("metrics.csv", "histories.json")
                    for p in root.rglob(name)})
    for folder in files:
        run_dir = folder.parent if _is_version(folder) and folder != root else folder
        found.setdefault(run_dir)
    return list(found)


def _csv_tasks(path: Path, epochs_per_task: int) -> dict[int, dict[str, float]]:
    """Per-task metrics from a CSVLogger ``metrics.csv``.

    A task's end metrics (``task/end_accuracy``, ``task/end_loss``, ...) are on one row at its
    last step, with the ``epoch`` set and ``task/id`` empty; its validation
    (``task/val_*``) on another row of the same epoch. The task is ``epoch // epochs_per_task``
    (the data module's task of an epoch); rows of training steps and measurements are skipped.
    """
    tasks: dict[int, dict[str, float]] = {}
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                values = {k[len("task/"):]: _float(v) for k, v in row.items()
                          if k and k.startswith("task/") and k not in _STEP_COLUMNS
                          and v not in ("", None)}
                epoch = _float(row.get("epoch"))
                if not values or not math.isfinite(epoch):
                    continue
                tasks.setdefault(int(epoch) // epochs_per_task, {}).update(values)
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        warnings.warn(f"collect: could not read {path} ({err}); its task metrics are skipped.",
                      stacklevel=2)
    return tasks


def _merge_histories(run: Run, data: Any, path: Path,
                     merged: dict[tuple[str, str, int, int], dict[str, Any]]) -> None:
    if not isinstance(data, dict):
        warnings.warn(f"collect: {path} is not a HistoryWriter file; skipped.", stacklevel=3)
        return
    run.has_histories = True
    for record in data.get("tasks") or []:
        task = _float(record.get("task"))
        if math.isfinite(task):
            values = {k: _float(v) for k, v in record.items() if k != "task"}
            run.tasks.setdefault(int(task), {}).update(values)
    for callback, records in (data.get("measurements") or {}).items():
        for record in records or []:
            task, step = _float(record.get("task")), _float(record.get("step"))
            if not math.isfinite(task):
                continue
            key = (callback, str(record.get("event")), int(task),
                   int(step) if math.isfinite(step) else -1)
            merged[key] = {**record, "callback": callback}


def _index_records(run: Run) -> None:
    """Fill ``measurements`` and ``spectra`` from ``records`` (in step order: the last
    measurement of a task and event wins)."""
    for record in run.records:
        event, task = str(record.get("event")), int(record["task"])
        for name, value in record.items():
            if name in ("task", "step", "event", "callback"):
                continue
            if isinstance(value, list):
                run.spectra.setdefault(event, {}).setdefault(task, {})[name] = \
                    [_float(v) for v in value]
            elif isinstance(value, (int, float)) or value is None:
                run.measurements.setdefault(event, {}).setdefault(task, {})[name] = \
                    _float(value)


def _load_versions(path: Path, name: str, versions: Sequence[Path]) -> Run:
    run = Run(path=path, name=name, versions=list(versions))
    merged: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    for version in versions:
        hparams = {**_top_level_scalars(version / "config.yaml"),
                   **_top_level_scalars(version / "hparams.yaml")}
        if hparams:
            run.hparams = hparams
        try:
            epochs_per_task = max(1, int(hparams.get("epochs_per_task", 1)))
        except ValueError:  # "null": one epoch per task
            epochs_per_task = 1
        if (version / "metrics.csv").is_file():
            for task, values in _csv_tasks(version / "metrics.csv", epochs_per_task).items():
                run.tasks.setdefault(task, {}).update(values)
        histories = version / "histories.json"
        if histories.is_file():
            _merge_histories(run, read_json(histories), histories, merged)
    run.records = sorted(merged.values(), key=lambda r: (int(r["task"]), _float(r.get("step"))))
    _index_records(run)
    return run


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read one run: a CSV logger's ``<name>`` folder (its ``version_<k>`` folders merged,
    later ones winning) or a single version folder.

    Raises:
        FileNotFoundError: when the folder has neither ``metrics.csv`` nor ``histories.json``
            (directly or in ``version_<k>`` folders).
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"collect: {path} is not a folder; pass a run's log folder.")
    versions = _version_folders(path)
    if not versions:
        raise FileNotFoundError(
            f"collect: no metrics.csv or histories.json in {path} or its version_<k> folders; "
            "pass the folder of a CSVLogger run (e.g. runs/<name>).")
    name = path.parent.name if _is_version(path) else path.name
    return _load_versions(path, name, versions)


def _load_cell_run(folder: Path) -> tuple[Run | None, str | None]:
    runs_root = folder / "runs" if (folder / "runs").is_dir() else folder
    run_dirs = _run_dirs(runs_root) if runs_root.is_dir() else []
    if not run_dirs:
        return None, "no metrics.csv or histories.json"
    if len(run_dirs) == 1:
        return load_run(run_dirs[0]), None
    # Several logger names in one cell: their versions in order of k, then name.
    versions = sorted((v for d in run_dirs for v in _version_folders(d)),
                      key=lambda v: (int(m.group(1)) if (m := _VERSION.fullmatch(v.name))
                                     else -1, str(v)))
    return _load_versions(runs_root, run_dirs[0].name, versions), None


# ---------------------------------------------------------------------------- reading a study
def _study_cells(path: Path, spec: dict[str, Any]) -> list[CellResult]:
    # The grid of study.json, as last run: folders outside it (results moved aside when a
    # cell's command changed, cells of an earlier grid) are not part of this study.
    listed = [c for c in spec.get("cells") or [] if isinstance(c, dict) and c.get("id")]
    ids = [str(c["id"]) for c in listed] or sorted(
        p.name for p in (path / "cells").glob("*") if p.is_dir() and ".stale-" not in p.name)
    by_id = {str(c["id"]): c for c in listed}
    cells = []
    for cell_id in ids:
        folder = path / "cells" / cell_id
        info = {**by_id.get(cell_id, {}), **(read_json(folder / "cell.json") or {})}
        status = read_json(folder / "status.json") or {}
        state = str(status.get("state") or "missing")
        cell = CellResult(
            id=cell_id, recipe=str(info.get("recipe", "?")),
            method=str(info.get("method", "?")), variant=str(info.get("variant", "default")),
            seed=int(info.get("seed", 0) or 0), state=state, path=folder,
            params=dict(info.get("params") or {}), returncode=status.get("returncode"),
            seconds=status.get("seconds"))
        try:
            cell.run, cell.error = _load_cell_run(folder) if folder.is_dir() else \
                (None, "no cell folder")
        except Exception as err:  # a broken cell is listed, never the end of the collection
            cell.run, cell.error = None, f"{type(err).__name__}: {err}"
        if state == "done" and cell.run is None:
            cell.state = "missing"
        if state == "failed" and cell.error is None:
            cell.error = f"returncode {cell.returncode}"
        cells.append(cell)
    return cells


def _plain_runs(path: Path) -> list[CellResult]:
    cells = []
    for run_dir in _run_dirs(path):
        cell_id = run_dir.relative_to(path).as_posix() if run_dir != path else path.name
        try:
            run = load_run(run_dir)
        except Exception as err:
            cells.append(CellResult(id=cell_id, recipe=run_dir.name, method="run",
                                    variant="default", seed=0, state="failed", path=run_dir,
                                    error=f"{type(err).__name__}: {err}"))
            continue
        cells.append(CellResult(id=cell_id, recipe=run.name, method="run", variant="default",
                                seed=run.seed, state="done", path=run_dir, run=run))
    return cells


def load_study(path: str | os.PathLike) -> Study:
    """Collect a study folder (with ``study.json``) or any folder with runs below it.

    Cells that failed, never ran or left no metrics are kept (see :meth:`Study.problems`) and
    never stop the collection.

    Raises:
        FileNotFoundError: when ``path`` does not exist or holds neither a ``study.json`` nor
            any ``metrics.csv``/``histories.json``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"collect: {path} is not a folder; pass a study folder (with "
                                "study.json) or a folder of Lightning runs.")
    spec_file = path / "study.json"
    if spec_file.is_file():
        spec = read_json(spec_file)
        if not isinstance(spec, dict):
            raise ValueError(f"collect: {spec_file} is not a JSON object; was it written by "
                             "`lightning-plasticity study`?")
        return Study(path, str(spec.get("name") or path.name), _study_cells(path, spec))
    cells = _plain_runs(path)
    if not cells:
        raise FileNotFoundError(
            f"collect: {path} has no study.json and no metrics.csv or histories.json below it; "
            "pass a study folder or a folder of Lightning CSVLogger runs.")
    return Study(path, path.name, cells, is_study=False)


# ---------------------------------------------------------------------------- aggregation
_ALIASES = {"eps_rank": EPS_RANK, "num_params": NUM_PARAMS}


def task_series(run: Run, key: str) -> dict[int, float]:
    """``task -> value`` of one quantity of ``run`` (finite values only).

    ``key`` is a column of :meth:`Run.table` (``end_accuracy``, ``end_loss``,
    ``online_accuracy``, ``eps_rank``, ``normalized_eps_rank``, ...), a logged task metric
    (``task/end_accuracy``), or a measurement's logged name (``curvature/entk_rank``: at the
    task's start, else its end, else any event; ``name@event`` for one event).
    """
    if key.startswith("task/"):
        key = key[len("task/"):]
    if key == "normalized_eps_rank":
        values = {r["task"]: r["normalized_eps_rank"] for r in run.table()}
    elif key in _ALIASES:
        values = {t: run.measurement(_ALIASES[key], t, "task_start") for t in run.task_ids()}
    elif "/" in key or "@" in key:
        name, _, event = key.partition("@")
        values = {t: run.measurement(name, t, event or None) for t in run.task_ids()}
    else:
        values = {t: _float(v.get(key)) for t, v in run.tasks.items()}
    return {int(t): float(v) for t, v in sorted(values.items()) if math.isfinite(v)}


def score_key(cells: Iterable[CellResult]) -> Literal["end_accuracy", "val_loss", "end_loss"]:
    """What a study scores its runs by: ``"end_accuracy"`` where the runs log it, else (regression
    streams) ``"val_loss"``, the module's validation loss on the task's held-out examples at the
    task's end, where logged: ``ContinualRegressor`` reports the mean squared error of its
    prediction there whatever it trains with (MSE, HL-Gauss, two-hot), so losses compare; else
    ``"end_loss"``, the training loss over the task's last batches."""
    runs = [c.run for c in cells if c.run is not None]
    if any(task_series(r, "end_accuracy") for r in runs):
        return "end_accuracy"
    for key in ("val_loss", "end_loss"):
        if any(task_series(r, key) for r in runs):
            return key  # type: ignore[return-value]
    return "end_accuracy"


@dataclass
class SeedStats:
    """A quantity per task over seeds: ``tasks`` and, per task, mean, std, min, max and the
    number of seeds with a value (NaN where none)."""

    tasks: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    count: np.ndarray


def seed_stats(cells: Iterable[CellResult], key: str) -> SeedStats:
    """Mean and spread of ``key`` (see :func:`task_series`) over the finished ``cells``."""
    series = [task_series(c.run, key) for c in cells if c.ok and c.run is not None]
    tasks = np.array(sorted({t for s in series for t in s}), dtype=int)
    values = np.full((len(series), len(tasks)), np.nan)
    index = {int(t): i for i, t in enumerate(tasks)}
    for row, s in enumerate(series):
        for t, v in s.items():
            values[row, index[t]] = v
    count = np.isfinite(values).sum(axis=0)
    if not len(tasks):
        return SeedStats(tasks, *(np.empty(0) for _ in range(4)), count)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a task no seed reached: NaN
        return SeedStats(tasks, np.nanmean(values, axis=0), np.nanstd(values, axis=0),
                         np.nanmin(values, axis=0), np.nanmax(values, axis=0), count)


def window_mean(series: dict[int, float], which: Literal["first", "last"],
                n: int = 10, tasks: Iterable[int] | None = None) -> float:
    """Mean of ``series`` over the first or last ``n`` tasks (all of them if fewer); NaN if none.

    ``tasks`` are the run's task ids (default: the keys of ``series``): the window is the first
    or last ``n`` of those, so a metric measured every k-th task is averaged over the
    measurements that fall in the window, not over its first or last ``n`` measurements.
    """
    if which not in ("first", "last"):
        raise ValueError(f"window_mean: which must be 'first' or 'last', got {which!r}.")
    if n < 1:
        raise ValueError(f"window_mean: n must be >= 1, got {n}.")
    ids = sorted(set(series) if tasks is None else set(tasks) | set(series))
    window = ids[:n] if which == "first" else ids[-n:]
    chosen = [series[t] for t in window if t in series]
    return float(np.mean(chosen)) if chosen else math.nan


def window_stats(cells: Iterable[CellResult], key: str, which: Literal["first", "last"],
                 n: int = 10) -> tuple[float, float, int]:
    """``(mean, std, seeds)`` over the finished ``cells`` of each one's :func:`window_mean`."""
    means = [window_mean(task_series(c.run, key), which, n, c.run.task_ids()) for c in cells
             if c.ok and c.run is not None]
    means = [m for m in means if math.isfinite(m)]
    if not means:
        return math.nan, math.nan, 0
    return float(np.mean(means)), float(np.std(means)), len(means)


@dataclass
class GroupSummary:
    """One (recipe, method, variant) of a study: its seeds and first/last-``n``-task means.

    Each ``(mean, std, seeds)`` triple is over seeds of each seed's mean over the tasks.
    ``score`` is the task-end accuracy (``score_key == "end_accuracy"``) or, for regression,
    the task-end loss.
    """

    recipe: str
    method: str
    variant: str
    cells: list[CellResult] = field(repr=False)
    score_key: str
    first_score: tuple[float, float, int]
    last_score: tuple[float, float, int]
    first_eps_rank: tuple[float, float, int]
    last_eps_rank: tuple[float, float, int]
    last_normalized_eps_rank: tuple[float, float, int]
    best: bool = False

    @property
    def seeds_done(self) -> int:
        return sum(c.ok for c in self.cells)


def summarize(study: Study, n: int = 10) -> list[GroupSummary]:
    """One :class:`GroupSummary` per (recipe, method, variant), best variants marked (see
    :func:`best_variants`)."""
    out = []
    for recipe in study.recipes():
        key = score_key(study.done(recipe))
        groups = []
        for (method, variant), cells in study.groups(recipe).items():
            groups.append(GroupSummary(
                recipe, method, variant, cells, key,
                window_stats(cells, key, "first", n), window_stats(cells, key, "last", n),
                window_stats(cells, "eps_rank", "first", n),
                window_stats(cells, "eps_rank", "last", n),
                window_stats(cells, "normalized_eps_rank", "last", n)))
        sign = 1.0 if key == "end_accuracy" else -1.0
        for method in dict.fromkeys(g.method for g in groups):
            scored = [g for g in groups if g.method == method and math.isfinite(g.last_score[0])]
            if scored:
                max(scored, key=lambda g: sign * g.last_score[0]).best = True
        out.extend(groups)
    return out


def best_variants(study: Study, n: int = 10) -> dict[tuple[str, str], str]:
    """``(recipe, method) -> variant`` with the highest last-``n``-task mean task-end accuracy
    over seeds (lowest loss for regression); methods without a finished seed are left out."""
    return {(g.recipe, g.method): g.variant for g in summarize(study, n) if g.best}


@dataclass
class Correlation:
    """Task-end score against the normalized eps-rank at the task's start, over every
    (finished cell, task) of a recipe: Spearman's rho and a least-squares line
    ``y = slope * x + intercept`` (NaN with fewer than 3 points or a constant axis)."""

    recipe: str
    score_key: str
    x: np.ndarray
    y: np.ndarray
    methods: list[str]
    rho: float
    pvalue: float
    slope: float
    intercept: float

    @property
    def n(self) -> int:
        return len(self.x)


def eps_rank_correlation(study: Study, recipe: str) -> Correlation:
    """:class:`Correlation` of ``recipe`` (every finished cell, every task measured)."""
    from scipy.stats import spearmanr

    cells = study.done(recipe)
    key = score_key(cells)
    xs, ys, methods = [], [], []
    for cell in cells:
        assert cell.run is not None
        x, y = task_series(cell.run, "normalized_eps_rank"), task_series(cell.run, key)
        for task in sorted(set(x) & set(y)):
            xs.append(x[task])
            ys.append(y[task])
            methods.append(cell.method)
    x_arr, y_arr = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    rho = pvalue = slope = intercept = math.nan
    if len(x_arr) >= 3 and np.ptp(x_arr) > 0 and np.ptp(y_arr) > 0:
        result = spearmanr(x_arr, y_arr)
        rho, pvalue = float(result[0]), float(result[1])
        slope, intercept = (float(v) for v in np.polyfit(x_arr, y_arr, 1))
    return Correlation(recipe, key, x_arr, y_arr, methods, rho, pvalue, slope, intercept)
