"""``TaskMetricsPlot``: a PNG of a per-task metric (task-end accuracy by default)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_plasticity.callbacks.figure import FigureCallback

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class TaskMetricsPlot(FigureCallback):
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

        >>> import os
        >>> import tempfile
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.callbacks import TaskMetricsPlot
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import ContinualClassifier
        >>> dm = ContinualDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=2,
        ...                          batch_size=16, val_size=32)
        >>> model = ContinualClassifier()
        >>> dirpath = tempfile.mkdtemp()  # default: the trainer's log_dir
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp(),
        ...                   callbacks=[TaskMetricsPlot(dirpath=dirpath)])
        >>> trainer.fit(model, datamodule=dm)
        >>> os.listdir(dirpath)  # written at the end of fit
        ['task_end_accuracy.png']
    """

    def __init__(
        self,
        metric: str = "end_accuracy",
        filename: str = "task_end_accuracy.png",
        dirpath: str | os.PathLike | None = None,
        every_n_tasks: int | None = None,
    ) -> None:
        super().__init__(filename=filename, dirpath=dirpath, every_n_tasks=every_n_tasks)
        self.metric = metric

    @property
    def wandb_key(self) -> str:
        return f"task/{self.metric}_plot"

    @override
    def draw(self, trainer: pl.Trainer) -> Figure | None:
        history: list[dict[str, Any]] = getattr(trainer.datamodule, "task_history", None) or []
        points = [(int(h["task"]), float(h[self.metric])) for h in history if self.metric in h]
        if not points:
            rank_zero_warn(f"TaskMetricsPlot: no {self.metric!r} in the task history; no plot.")
            return None
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
        return fig
