"""``WandbTaskAxis``: task-indexed wandb charts, spectra tables and the accuracy vs eps-rank plot.

Lightning's :class:`~lightning.pytorch.loggers.WandbLogger` plots every metric against
``trainer/global_step`` (it defines the glob ``*`` with that step metric). Plasticity papers plot
task-level quantities against the task. This callback makes wandb do the same:

* every task-level and measurement metric (``task/end_*``, ``task/online_*``,
  ``task/steps_to_target``, ``task/trainable``, ``task/val_*`` and everything under the
  measurement and intervention prefixes: ``curvature/``, ``units/``, ``features/``, ``params/``,
  ``grads/``, ``plasticity/``, ``intervention/``) is defined with ``task/id`` as its step metric,
  by name, the first time it is logged (wandb resolves a key that matches two globs to the
  first one defined, which is Lightning's ``*``), and every wandb row that carries one gets the
  current ``task/id`` (so the axis is right even for a task that logged no training step);
* measured spectra (the top Hessian eigenvalues, eNTK eigenvalues, feature singular values) go
  to wandb as incremental tables ``<key>_table`` with columns ``task``, ``index``, ``eigenvalue``
  (``value`` for spectra that are not eigenvalues), one row per eigenvalue, from which a
  line-per-task or heatmap panel is drawn (see :mod:`lightning_plasticity.dashboard`);
* at the end of fit, task-end accuracy against the normalised Hessian eps-rank at the task's start
  is logged as a wandb scatter plot, ``curvature/accuracy_vs_eps_rank``.

Everything happens on rank 0, only when a ``WandbLogger`` is present, and a wandb problem warns
once and never stops training.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from typing_extensions import override

__all__ = [
    "MEASUREMENT_PREFIXES",
    "SCATTER_KEY",
    "TASK_AXIS",
    "WandbTaskAxis",
    "accuracy_vs_eps_rank_rows",
    "is_task_indexed",
    "log_spectra",
    "spectrum_rows",
    "spectrum_table_key",
    "task_axis_globs",
]

#: the x-axis of every task-level metric
TASK_AXIS = "task/id"
#: the prefixes of the package's measurements and interventions
MEASUREMENT_PREFIXES: tuple[str, ...] = ("curvature", "units", "features", "params", "grads",
                                         "plasticity", "intervention")
#: the data module's task-level metrics (``task/train_*`` are per step: global-step axis)
TASK_METRIC_GLOBS: tuple[str, ...] = ("task/end_*", "task/online_*", "task/steps_to_target",
                                      "task/trainable", "task/val_*")
#: the wandb key of the accuracy vs eps-rank scatter plot (its table is ``<key>_table``)
SCATTER_KEY = "curvature/accuracy_vs_eps_rank"
_EPS_RANK_NORMALIZED = "curvature/hessian_eps_rank_normalized"


def task_axis_globs(prefixes: Iterable[str] = MEASUREMENT_PREFIXES) -> list[str]:
    """The wandb globs of the metrics that are plotted against ``task/id``.

    Example::

        >>> task_axis_globs(["curvature"])
        ['task/end_*', 'task/online_*', 'task/steps_to_target', 'task/trainable', 'task/val_*', \
'curvature/*']
    """
    return [*TASK_METRIC_GLOBS, *(f"{p}/*" for p in prefixes)]


def is_task_indexed(key: str, prefixes: Iterable[str] = MEASUREMENT_PREFIXES) -> bool:
    """Whether the metric ``key`` is plotted against ``task/id`` (see :func:`task_axis_globs`).

    Example::

        >>> is_task_indexed("curvature/hessian_eps_rank"), is_task_indexed("task/end_accuracy")
        (True, True)
        >>> is_task_indexed("task/train_loss"), is_task_indexed("task/id")
        (False, False)
    """
    return key != TASK_AXIS and any(fnmatchcase(key, g) for g in task_axis_globs(prefixes))


def spectrum_table_key(key: str) -> str:
    """The wandb table of the spectrum ``key``.

    Example::

        >>> spectrum_table_key("curvature/hessian_top_eigenvalues")
        'curvature/hessian_top_eigenvalues_table'
    """
    return f"{key}_table"


def spectrum_columns(key: str) -> list[str]:
    """``["task", "index", "eigenvalue"]``, or ``"value"`` last for a spectrum of other values
    (singular values).

    Example::

        >>> spectrum_columns("curvature/hessian_top_eigenvalues")
        ['task', 'index', 'eigenvalue']
        >>> spectrum_columns("features/singular_values")
        ['task', 'index', 'value']
    """
    return ["task", "index", "eigenvalue" if "eigenvalue" in key else "value"]


def spectrum_rows(task: int, values: Sequence[float] | Tensor) -> list[list[float]]:
    """Rows ``[task, index, value]`` of one spectrum, largest value first, ``index`` from 1;
    non-finite values are dropped.

    Example::

        >>> spectrum_rows(3, [0.5, 2.0, float("nan")])
        [[3, 1, 2.0], [3, 2, 0.5]]
    """
    if isinstance(values, Tensor):
        values = values.detach().flatten().cpu().tolist()
    finite = sorted((float(v) for v in values if v is not None and math.isfinite(float(v))),
                    reverse=True)
    return [[int(task), i + 1, v] for i, v in enumerate(finite)]


def accuracy_vs_eps_rank_rows(task_history: Sequence[Mapping[str, Any]],
                              records: Iterable[Mapping[str, Any]],
                              x_key: str = _EPS_RANK_NORMALIZED,
                              y_key: str = "end_accuracy") -> list[list[float]]:
    """``[task, x, y]`` per task that has both: ``y_key`` of its task-history record and
    ``x_key`` measured at its start (``task_start``; for task 0 also ``fit_start``).

    Example::

        >>> history = [{"task": 0.0, "end_accuracy": 0.9}, {"task": 1.0, "end_accuracy": 0.5}]
        >>> records = [{"task": 0, "event": "task_start", "curvature/x": 0.2},
        ...            {"task": 1, "event": "task_end", "curvature/x": 0.1}]
        >>> accuracy_vs_eps_rank_rows(history, records, x_key="curvature/x")
        [[0, 0.2, 0.9]]
    """
    at_start: dict[int, float] = {}
    for r in records:
        task, event, value = r.get("task"), r.get("event"), r.get(x_key)
        if task is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if event == "task_start" or (event == "fit_start" and int(task) == 0):
            at_start[int(task)] = float(value)
    rows = []
    for h in task_history:
        task, y = int(h["task"]), h.get(y_key)
        if task in at_start and isinstance(y, (int, float)) and math.isfinite(y):
            rows.append([task, at_start[task], float(y)])
    return rows


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(f"{message}. Training goes on.", stacklevel=3)


def _task_id(trainer: pl.Trainer) -> int:
    """The current task (the epoch without a task stream)."""
    task = getattr(trainer.datamodule, "task_id", None)
    return int(task) if isinstance(task, int) else int(trainer.current_epoch)


def log_spectra(trainer: pl.Trainer, logger: WandbLogger, spectra: Mapping[str, Tensor],
                step: int) -> None:
    """Send measured spectra to ``logger`` (rank 0): a ``wandb.Histogram`` per spectrum at
    ``trainer/global_step`` and, when a :class:`WandbTaskAxis` is among the callbacks, its
    incremental ``(task, index, eigenvalue)`` table and the current ``task/id``.

    The one place measurements send spectra to wandb (called by
    :func:`~lightning_plasticity.callbacks.log_now.log_now`). A wandb error warns once.
    """
    try:
        import wandb

        payload: dict[str, Any] = {k: wandb.Histogram(v.detach().cpu().numpy())
                                   for k, v in spectra.items()}
        axis = WandbTaskAxis.of(trainer)
        if axis is not None:
            payload.update(axis.spectrum_tables(trainer, spectra))
            axis.define(logger, payload)
            payload[TASK_AXIS] = _task_id(trainer)
        logger.experiment.log({**payload, "trainer/global_step": step})
    except Exception as err:  # a logging problem never stops training
        _warn_once(f"could not send the spectra {sorted(spectra)} to wandb "
                   f"({type(err).__name__}: {err})")


class _TaskAxisLogMetrics:
    """Replaces a ``WandbLogger``'s ``log_metrics`` for one fit: defines new task-indexed keys
    with ``task/id`` as their step metric and adds the current ``task/id`` to their rows."""

    def __init__(self, axis: WandbTaskAxis, trainer: pl.Trainer, logger: WandbLogger) -> None:
        self.axis, self.trainer, self.logger = axis, trainer, logger
        self.original = logger.log_metrics
        #: an instance attribute someone else put there before (restored at teardown)
        self.replaced = logger.__dict__.get("log_metrics")

    def __call__(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        try:
            metrics = self.axis.with_task_axis(self.trainer, self.logger, metrics)
        except Exception as err:
            self.axis._warn_once(f"could not put task/id on a wandb row ({type(err).__name__}: "
                                 f"{err}); it keeps the global step axis")
        self.original(metrics, step)


class WandbTaskAxis(Callback):
    """Task-indexed wandb charts: ``task/id`` as the x-axis of task-level and measurement
    metrics, spectra as per-task tables, and the accuracy vs eps-rank scatter plot.

    Does nothing without a :class:`~lightning.pytorch.loggers.WandbLogger` (other loggers are
    untouched). See the module docstring for what is logged; a wandb error warns once and
    training goes on. Holds no state worth a checkpoint: after a resume the first spectrum
    table of the new fit carries the spectra of the restored measurement histories.

    Args:
        prefixes: metric prefixes plotted against ``task/id`` besides ``task/end_*``,
            ``task/online_*``, ``task/steps_to_target``, ``task/trainable`` and ``task/val_*``
            (default: the package's measurement and intervention prefixes). The prefix of every
            measurement callback in the trainer is added.
        spectra_tables: log measured spectra as incremental ``(task, index, eigenvalue)``
            tables.
        scatter: log the scatter of ``scatter_y`` (a key of the data module's task history)
            against ``scatter_x`` (a measurement at the task's start) at the end of fit.
        scatter_x: the measured x of the scatter plot.
        scatter_y: the task-history y of the scatter plot.

    Example::

        >>> import tempfile
        >>> from lightning.pytorch import Trainer
        >>> from lightning.pytorch.loggers import WandbLogger
        >>> from lightning_plasticity.callbacks import HessianRankCallback, WandbTaskAxis
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import ContinualClassifier
        >>> dm = ContinualDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=2,
        ...                          batch_size=16, val_size=32)
        >>> logger = WandbLogger(save_dir=tempfile.mkdtemp(), offline=True)
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=logger,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp(),
        ...                   callbacks=[HessianRankCallback(last_n_layers=1, probe_size=32,
        ...                                                  max_overhead=None),
        ...                              WandbTaskAxis()])
        >>> trainer.fit(ContinualClassifier(), datamodule=dm)
        >>> axis = WandbTaskAxis.of(trainer)
        >>> "curvature/hessian_eps_rank" in axis.defined, "task/end_accuracy" in axis.defined
        (True, True)
        >>> axis.table_rows["curvature/hessian_top_eigenvalues_table"][0][:2]  # task 0, index 1
        [0, 1]
        >>> logger.experiment.finish()
    """

    def __init__(self, prefixes: Sequence[str] | None = None, spectra_tables: bool = True,
                 scatter: bool = True, scatter_x: str = _EPS_RANK_NORMALIZED,
                 scatter_y: str = "end_accuracy") -> None:
        prefixes = list(MEASUREMENT_PREFIXES if prefixes is None else prefixes)
        for p in prefixes:
            if not isinstance(p, str) or not p or p.endswith(("/", "*")):
                raise ValueError(f"WandbTaskAxis: prefixes must be metric prefixes such as "
                                 f"'curvature' (no trailing '/' or '*'), got {p!r}.")
        if not scatter_x or not scatter_y:
            raise ValueError("WandbTaskAxis: scatter_x and scatter_y must name metrics, e.g. "
                             f"{_EPS_RANK_NORMALIZED!r} and 'end_accuracy'.")
        self.prefixes = prefixes
        self.spectra_tables, self.scatter = spectra_tables, scatter
        self.scatter_x, self.scatter_y = scatter_x, scatter_y
        #: the keys defined with ``task/id`` as their step metric in this fit
        self.defined: set[str] = set()
        self._defined_by: dict[int, set[str]] = {}
        #: the rows sent per spectrum table in this fit
        self.table_rows: dict[str, list[list[float]]] = {}
        self._tables: dict[str, Any] = {}
        self._patched: list[_TaskAxisLogMetrics] = []
        self._warned: set[str] = set()
        self._trainer: pl.Trainer | None = None

    @staticmethod
    def of(trainer: pl.Trainer) -> WandbTaskAxis | None:
        """The trainer's ``WandbTaskAxis`` callback, or None."""
        return next((c for c in trainer.callbacks if isinstance(c, WandbTaskAxis)), None)

    @staticmethod
    def _wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"WandbTaskAxis: {message}. Training goes on.", stacklevel=2)

    def _all_prefixes(self, trainer: pl.Trainer | None) -> list[str]:
        found = list(self.prefixes)
        for cb in trainer.callbacks if trainer is not None else []:
            prefix = getattr(type(cb), "prefix", None)
            if isinstance(prefix, str) and prefix and prefix not in found:
                found.append(prefix)
        return found

    # ------------------------------------------------------------------ the task axis
    def define(self, logger: WandbLogger, keys: Iterable[str]) -> None:
        """Define each new task-indexed key of ``keys`` with ``task/id`` as its step metric."""
        prefixes = self._all_prefixes(self._trainer)
        done = self._defined_by.setdefault(id(logger), set())
        new = [k for k in keys if k not in done and is_task_indexed(k, prefixes)]
        for key in new:
            logger.experiment.define_metric(key, step_metric=TASK_AXIS)
            done.add(key)
            self.defined.add(key)

    def with_task_axis(self, trainer: pl.Trainer, logger: WandbLogger,
                       metrics: Mapping[str, Any]) -> Mapping[str, Any]:
        """``metrics`` with the current ``task/id`` added when it holds a task-indexed key."""
        prefixes = self._all_prefixes(trainer)
        if not any(is_task_indexed(k, prefixes) for k in metrics):
            return metrics
        self.define(logger, metrics)
        if TASK_AXIS in metrics:
            return metrics
        return {**metrics, TASK_AXIS: _task_id(trainer)}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        self.defined, self._defined_by, self.table_rows, self._tables = set(), {}, {}, {}
        if not trainer.is_global_zero:
            return
        for logger in self._wandb_loggers(trainer):
            if isinstance(logger.__dict__.get("log_metrics"), _TaskAxisLogMetrics):
                continue
            patch = _TaskAxisLogMetrics(self, trainer, logger)
            logger.log_metrics = patch  # type: ignore[method-assign]
            self._patched.append(patch)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in self._wandb_loggers(trainer):
            try:
                run = logger.experiment
                run.define_metric(TASK_AXIS)
                for glob in task_axis_globs(self._all_prefixes(trainer)):
                    run.define_metric(glob, step_metric=TASK_AXIS)
            except Exception as err:
                self._warn_once(f"could not define the task axis in wandb "
                                f"({type(err).__name__}: {err})")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Restore the loggers' own method: nothing of this fit stays behind (or gets pickled).
        for patch in self._patched:
            if patch.logger.__dict__.get("log_metrics") is not patch:
                continue  # replaced again since: leave it
            if patch.replaced is None:
                del patch.logger.log_metrics
            else:
                patch.logger.log_metrics = patch.replaced  # type: ignore[method-assign]
        self._patched = []
        self._trainer = None

    # ------------------------------------------------------------------ spectra
    def spectrum_tables(self, trainer: pl.Trainer,
                        spectra: Mapping[str, Tensor]) -> dict[str, Any]:
        """``{"<key>_table": wandb.Table}`` for the spectra just measured: one incremental table
        per key, so each log sends only the new rows (the first of a fit also the spectra of
        the measurement histories restored from a checkpoint)."""
        if not self.spectra_tables:
            return {}
        import wandb

        task, out = _task_id(trainer), {}
        for key, values in spectra.items():
            table_key = spectrum_table_key(key)
            rows = spectrum_rows(task, values)
            table = self._tables.get(table_key)
            if table is None:
                table = wandb.Table(columns=spectrum_columns(key), log_mode="INCREMENTAL")
                self._tables[table_key] = table
                self.table_rows[table_key] = []
                rows = self._restored_rows(trainer, key) + rows
            for row in rows:
                table.add_data(*row)
            self.table_rows[table_key].extend(rows)
            out[table_key] = table
        return out

    @staticmethod
    def _restored_rows(trainer: pl.Trainer, key: str) -> list[list[float]]:
        # log_now runs before the measurement's own record is appended: the history holds only
        # earlier measurements (those of the run before a resume, or none).
        rows: list[list[float]] = []
        for cb in trainer.callbacks:
            for record in getattr(cb, "history", None) or []:
                if isinstance(record, Mapping) and isinstance(record.get(key), list):
                    rows += spectrum_rows(int(record.get("task", 0)), record[key])
        return rows

    # ------------------------------------------------------------------ scatter
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = self._wandb_loggers(trainer)
        if not (self.scatter and loggers and trainer.is_global_zero):
            return
        history = getattr(trainer.datamodule, "task_history", None) or []
        records = [r for cb in trainer.callbacks for r in getattr(cb, "history", None) or []
                   if isinstance(r, Mapping)]
        rows = accuracy_vs_eps_rank_rows(history, records, self.scatter_x, self.scatter_y)
        if not rows:  # no Hessian measured (or no task finished): nothing to plot
            return
        x, y = self.scatter_x.rsplit("/", 1)[-1], self.scatter_y.rsplit("/", 1)[-1]
        try:
            import wandb

            table = wandb.Table(columns=["task", x, y], data=rows)
            plot = wandb.plot.scatter(table, x, y, title=f"{y} vs {x} at the task's start")
            for logger in loggers:
                logger.experiment.log({SCATTER_KEY: plot,
                                       "trainer/global_step": trainer.global_step})
        except Exception as err:
            self._warn_once(f"could not log the {y} vs {x} plot to wandb "
                            f"({type(err).__name__}: {err})")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}
