"""``FigureCallback``: the shell shared by the plotting callbacks (when, where, wandb)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_plasticity.callbacks.run_folder import run_folder
from lightning_plasticity.core.process_group import destroy_process_group_at_exit

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class FigureCallback(Callback):
    """Writes the figure of :meth:`draw` as a PNG at the end of fit (and every
    ``every_n_tasks`` tasks, if given) into ``dirpath`` (default: the trainer's ``log_dir``), on
    rank 0 only, and sends the final one to any :class:`~lightning.pytorch.loggers.WandbLogger`.

    Args:
        filename: name of the PNG.
        dirpath: folder for the PNG; default the trainer's ``log_dir``.
        every_n_tasks: also rewrite the figure every this many tasks (``None``: only at the end).
    """

    def __init__(self, filename: str, dirpath: str | os.PathLike | None = None,
                 every_n_tasks: int | None = None) -> None:
        name = type(self).__name__
        if not filename.endswith(".png"):
            raise ValueError(f"{name}: filename must end with .png, got {filename!r}.")
        if every_n_tasks is not None and every_n_tasks < 1:
            raise ValueError(f"{name}: every_n_tasks must be >= 1 or None, got {every_n_tasks}.")
        self.filename, self.every_n_tasks = filename, every_n_tasks
        self.dirpath = None if dirpath is None else Path(dirpath)
        #: where the figure was last written (None before the first one)
        self.last_path: Path | None = None

    def draw(self, trainer: pl.Trainer) -> Figure | None:
        """The figure to write, or None (after a warning) when there is nothing to draw."""
        raise NotImplementedError

    @property
    def wandb_key(self) -> str:
        return self.filename.removesuffix(".png")

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                    task_id: int) -> None:
        if self.every_n_tasks is not None and (task_id + 1) % self.every_n_tasks == 0:
            self._write(trainer, self._folder(trainer), log_to_wandb=False)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:  # every worker, spawned ones included
            destroy_process_group_at_exit()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, self._folder(trainer), log_to_wandb=True)

    def _folder(self, trainer: pl.Trainer) -> Path:
        return run_folder(trainer, self.dirpath)  # on every rank (see run_folder)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, folder: Path, log_to_wandb: bool) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window on a cluster node
        import matplotlib.pyplot as plt

        fig = self.draw(trainer)
        if fig is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.filename
        fig.savefig(path)
        plt.close(fig)
        self.last_path = path
        if log_to_wandb:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=self.wandb_key, images=[str(path)])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}
