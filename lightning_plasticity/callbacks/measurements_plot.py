"""``MeasurementsPlot``: one PNG with task-end accuracy and every measurement over training."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_plasticity.callbacks.figure import FigureCallback
from lightning_plasticity.callbacks.measurement import MeasurementCallback

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: What is plotted by default, in this order, when measured: the symptom first, then the
#: mechanisms the seeds tie to it.
DEFAULT_METRICS: tuple[str, ...] = (
    "task/end_accuracy",
    "curvature/hessian_eps_rank_normalized",
    "curvature/hessian_top_eigenvalue",
    "curvature/grad_hessian_overlap",
    "curvature/kfac_eps_rank_normalized",
    "curvature/entk_rank",
    "units/dead_fraction",
    "units/dormant_fraction",
    "features/effective_rank",
    "features/srank",
    "params/total/norm",
    "params/total/distance_from_init",
    "grads/mean_cosine",
    "plasticity/relative_final_loss",
)


class MeasurementsPlot(FigureCallback):
    """Plots task-end accuracy and the measurement callbacks' histories in one figure.

    One panel per metric, all against training progress in tasks (the step divided by the
    steps of a task), or in epochs without a ContinualDataModule (the step divided by the
    optimizer steps of an epoch; step-scheduled measurements are plotted too), so a drop in
    accuracy can be
    read against the curvature, unit, feature and parameter measurements at the same point.
    Values come from :attr:`ContinualDataModule.task_history` (``task/<name>``) and from the
    ``history`` of every :class:`MeasurementCallback` in the trainer; a measurement made at
    several events (task start, task end, steps) is one line per event. The figure is written
    at the end of fit (and every ``every_n_tasks`` tasks, if given) into ``dirpath`` (default:
    the trainer's ``log_dir``), on rank 0 only, and sent to any
    :class:`~lightning.pytorch.loggers.WandbLogger`.

    Args:
        metrics: metric names to plot, e.g. ``"units/dead_fraction"`` or
            ``"task/online_accuracy"``; default: those of :data:`DEFAULT_METRICS` that were
            measured.
        filename: name of the PNG.
        dirpath: folder for the PNG; default the trainer's ``log_dir``.
        every_n_tasks: also rewrite the figure every this many tasks (``None``: only at the end).
        ncols: panels per row.

    Example::

        >>> import os
        >>> import tempfile
        >>> from functools import partial
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.callbacks import (
        ...     KFACCallback, MeasurementsPlot, UnitActivityCallback)
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import MLP, ContinualClassifier
        >>> dm = ContinualDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=2,
        ...                          batch_size=16, val_size=32)
        >>> model = ContinualClassifier(network=partial(MLP, width=16))
        >>> dirpath = tempfile.mkdtemp()  # default: the trainer's log_dir
        >>> callbacks = [KFACCallback(probe_size=32), UnitActivityCallback(probe_size=64),
        ...              MeasurementsPlot(dirpath=dirpath)]
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp(),
        ...                   callbacks=callbacks)
        >>> trainer.fit(model, datamodule=dm)
        >>> os.listdir(dirpath)  # written at the end of fit
        ['measurements.png']
    """

    def __init__(
        self,
        metrics: Sequence[str] | None = None,
        filename: str = "measurements.png",
        dirpath: str | os.PathLike | None = None,
        every_n_tasks: int | None = None,
        ncols: int = 3,
    ) -> None:
        super().__init__(filename=filename, dirpath=dirpath, every_n_tasks=every_n_tasks)
        if ncols < 1:
            raise ValueError(f"MeasurementsPlot: ncols must be >= 1, got {ncols}.")
        if metrics is not None and (isinstance(metrics, str) or not all(
                isinstance(m, str) and "/" in m for m in metrics)):
            raise ValueError("MeasurementsPlot: metrics must be a list of names like "
                             f"'units/dead_fraction' or 'task/end_accuracy', got {metrics!r}.")
        self.metrics = None if metrics is None else list(metrics)
        self.ncols = ncols

    @staticmethod
    def progress_unit(trainer: pl.Trainer) -> tuple[str, float | None]:
        """``("task", steps per task)`` with a ContinualDataModule, else ``("epoch", steps per
        epoch)``; the step count is None when it is not known (an iterable of unknown length)."""
        dm = trainer.datamodule
        batches = trainer.num_training_batches
        per_epoch = (max(int(batches) // max(trainer.accumulate_grad_batches, 1), 1)
                     if isinstance(batches, int) or (isinstance(batches, float) and
                                                     math.isfinite(batches)) else None)
        if callable(getattr(dm, "probe_batch", None)):
            steps = getattr(dm, "steps_per_task", None)
            if steps:
                return "task", float(steps)
            epochs = getattr(dm, "epochs_per_task", None)
            return "task", (float(epochs * per_epoch) if epochs and per_epoch else None)
        return "epoch", None if per_epoch is None else float(per_epoch)

    @staticmethod
    def series(trainer: pl.Trainer) -> dict[str, dict[str, list[tuple[float, float]]]]:
        """``{metric: {event: [(x, value), ...]}}`` from the task history and the measurement
        callbacks, with ``x`` in tasks or epochs (see the class docstring)."""
        dm = trainer.datamodule
        _, steps_per_task = MeasurementsPlot.progress_unit(trainer)
        out: dict[str, dict[str, list[tuple[float, float]]]] = {}

        def add(name: str, event: str, x: float | None, value: Any) -> None:
            if x is None or isinstance(value, (list, tuple)) or value is None:
                return
            value = float(value)
            if math.isfinite(value):
                out.setdefault(name, {}).setdefault(event, []).append((x, value))

        for record in getattr(dm, "task_history", None) or []:
            x = (record["global_step"] / steps_per_task if steps_per_task and
                 "global_step" in record else float(record["task"]) + 1.0)
            for key, value in record.items():
                if key not in ("task", "global_step"):
                    add(f"task/{key}", "task end", x, value)
        for callback in trainer.callbacks:
            if not isinstance(callback, MeasurementCallback):
                continue
            for record in callback.history:
                event = str(record.get("event", ""))
                if steps_per_task:
                    x: float | None = record["step"] / steps_per_task
                elif event in ("task_start", "fit_start"):
                    x = float(record["task"])
                elif event in ("task_end", "epoch_end"):
                    x = float(record["task"]) + 1.0
                else:
                    x = None  # a step measurement without a step scale
                for key, value in record.items():
                    if key not in ("task", "step", "event"):
                        add(key, event.replace("_", " "), x, value)
        return out

    @property
    def wandb_key(self) -> str:
        return "measurements_plot"

    @override
    def draw(self, trainer: pl.Trainer) -> Figure | None:
        series = self.series(trainer)
        unit, _ = self.progress_unit(trainer)
        if self.metrics is None:
            names = [m for m in DEFAULT_METRICS if m in series]
        else:
            missing = [m for m in self.metrics if m not in series]
            if missing:
                rank_zero_warn(f"MeasurementsPlot: nothing measured yet for {missing}; "
                               "those panels are left out.")
            names = [m for m in self.metrics if m in series]
        if not names:
            rank_zero_warn("MeasurementsPlot: no measurements to plot; add measurement "
                           "callbacks or a ContinualDataModule.")
            return None
        import matplotlib.pyplot as plt

        ncols = min(self.ncols, len(names))
        nrows = math.ceil(len(names) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.6 * nrows), dpi=110,
                                 squeeze=False)
        for ax, name in zip(axes.flat, names):
            for event, points in sorted(series[name].items()):
                points.sort()
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=2, linewidth=1.0, label=event)
            if len(series[name]) > 1:
                ax.legend(fontsize=6, frameon=False)
            ax.set_title(name, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.set_xlabel(unit, fontsize=7)
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        fig.tight_layout()
        return fig
