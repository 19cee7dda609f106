"""``TaskMetricsPlot``: a PNG of a per-task metric (task-end accuracy by default)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from typing_extensions import override


class TaskMetricsPlot(Callback):
    """Plots a metric of :attr:`ContinualDataModule.task_history` against the task index.

    The figure is written at the end of fit (and every ``every_n_tasks`` tasks, if given) into
    ``dirpath`` (default: the trainer's ``log_dir``), on rank 0 only, and also sent to any
    :class:`~lightning.pytorch.loggers.WandbLogger`. Loss of plasticity shows as a downward trend
    of task-end accuracy on tasks of equal difficulty.

    Args:
        metric: a key of the task history: ``end_accuracy`` or ``end_loss``.
        filename: name of the PNG.
        dirpath: folder for the PNG; default the trainer's ``log_dir``.
        every_n_tasks: also rewrite the figure every this many tasks (``None``: only at the end).

    Example::

        trainer = Trainer(callbacks=[TaskMetricsPlot()])
        trainer.fit(model, datamodule=ContinualDataModule(num_tasks=30))
        # -> <log_dir>/task_end_accuracy.png
    """

    def __init__(
        self,
        metric: str = "end_accuracy",
        filename: str = "task_end_accuracy.png",
        dirpath: str | os.PathLike | None = None,
        every_n_tasks: int | None = None,
    ) -> None:
        if not filename.endswith(".png"):
            raise ValueError(f"filename must end with .png, got {filename!r}.")
        if every_n_tasks is not None and every_n_tasks < 1:
            raise ValueError(f"every_n_tasks must be >= 1 or None, got {every_n_tasks}.")
        self.metric, self.filename, self.every_n_tasks = metric, filename, every_n_tasks
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.last_path: Path | None = None

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                    task_id: int) -> None:
        if self.every_n_tasks is not None and (task_id + 1) % self.every_n_tasks == 0:
            self._write(trainer, log_to_wandb=False)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, log_to_wandb=True)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, log_to_wandb: bool) -> None:
        history: list[dict[str, Any]] = getattr(trainer.datamodule, "task_history", None) or []
        points = [(int(h["task"]), float(h[self.metric])) for h in history if self.metric in h]
        if not points:
            rank_zero_warn(f"TaskMetricsPlot: no {self.metric!r} in the task history; no plot.")
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tasks, values = zip(*points)
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        ax.plot(tasks, values, marker="o", markersize=3, linewidth=1.2)
        ax.set_xlabel("task")
        ax.set_ylabel(self.metric.replace("_", " "))
        dm = trainer.datamodule
        if "accuracy" in self.metric:
            ax.set_ylim(0.0, 1.02)
            classes = getattr(dm, "num_outputs", None)
            if classes and not getattr(dm, "is_regression", False):
                ax.axhline(1.0 / classes, color="grey", linestyle="--", linewidth=1,
                           label="chance")
                ax.legend(loc="lower left", frameon=False)
        stream = f"{getattr(dm, 'task_name', '')} on {getattr(dm, 'dataset_name', '')}"
        ax.set_title(f"{self.metric.replace('_', ' ')}: {stream}" if hasattr(dm, "task_name")
                     else self.metric.replace("_", " "))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        folder = self.dirpath or Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.filename
        fig.savefig(path)
        plt.close(fig)
        self.last_path = path
        if log_to_wandb:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"task/{self.metric}_plot", images=[str(path)])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}
