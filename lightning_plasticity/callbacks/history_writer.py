"""``HistoryWriter``: the per-task metrics and every measurement history as one JSON file."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_plasticity.callbacks.measurement import MeasurementCallback
from lightning_plasticity.callbacks.run_folder import run_folder
from lightning_plasticity.core.json_file import write_json

__all__ = ["HistoryWriter", "histories_of", "to_json"]


def to_json(value: Any) -> Any:
    """``value`` with tensors and numpy values as lists/floats and non-finite floats as None
    (JSON has no NaN: ``json.dumps`` would write a token other readers reject)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    elif hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def histories_of(trainer: pl.Trainer) -> dict[str, Any]:
    """``{"tasks": [...], "measurements": {name: [...]}}`` of a trainer, JSON-ready.

    ``tasks`` is the data module's ``task_history`` (``[]`` without one); ``measurements``
    holds the ``history`` of every :class:`MeasurementCallback`, keyed by class name (``_1``,
    ``_2``, ... appended when two callbacks share one).
    """
    tasks = getattr(trainer.datamodule, "task_history", None) or []
    measurements: dict[str, Any] = {}
    for callback in trainer.callbacks:
        if not isinstance(callback, MeasurementCallback):
            continue
        name, n = type(callback).__name__, 0
        key = name
        while key in measurements:
            n += 1
            key = f"{name}_{n}"
        measurements[key] = to_json(callback.history)
    return {"tasks": to_json(list(tasks)), "measurements": measurements}


class HistoryWriter(Callback):
    """Writes the per-task metrics and every measurement callback's history to a JSON file.

    Measurement histories otherwise live only in checkpoints; this file keeps them next to
    ``metrics.csv`` in a form any tool can read (it is what ``lightning_plasticity.study``
    collects). The file, ``{"tasks": [...], "measurements": {"<CallbackClass>": [...]}}``
    (see :func:`histories_of`), is rewritten at the end of every task and at the end of fit,
    so an interrupted run keeps the histories of its finished tasks. Spectra are lists and
    non-finite values ``null``. Written on rank 0 only, atomically (a temporary file
    renamed over the old one), into ``dirpath`` (default: the trainer's ``log_dir``).

    Args:
        filename: name of the JSON file.
        dirpath: folder for the file; default the trainer's ``log_dir``.

    Example::

        >>> import json, tempfile
        >>> from functools import partial
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.callbacks import HistoryWriter, UnitActivityCallback
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import MLP, ContinualClassifier
        >>> dm = ContinualDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=2,
        ...                          batch_size=16, val_size=32)
        >>> writer = HistoryWriter(dirpath=tempfile.mkdtemp())
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   callbacks=[UnitActivityCallback(probe_size=32), writer],
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp())
        >>> trainer.fit(ContinualClassifier(network=partial(MLP, width=16)), datamodule=dm)
        >>> saved = json.loads(writer.last_path.read_text())
        >>> [int(t["task"]) for t in saved["tasks"]]
        [0, 1]
        >>> [(r["task"], r["event"]) for r in saved["measurements"]["UnitActivityCallback"]]
        [(0, 'task_start'), (0, 'task_end'), (1, 'task_start'), (1, 'task_end')]
    """

    def __init__(self, filename: str = "histories.json",
                 dirpath: str | os.PathLike | None = None) -> None:
        if not isinstance(filename, str) or not filename.endswith(".json") or \
                Path(filename).name != filename:
            raise ValueError(f"HistoryWriter: filename must be a file name ending in .json "
                             f"(no folder: pass that as dirpath), got {filename!r}.")
        self.filename = filename
        self.dirpath = None if dirpath is None else Path(dirpath)
        #: where the file was last written (None before the first write)
        self.last_path: Path | None = None

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                    task_id: int) -> None:
        self._write(trainer, self._folder(trainer))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, self._folder(trainer))

    def _folder(self, trainer: pl.Trainer) -> Path:
        return run_folder(trainer, self.dirpath)  # on every rank (see run_folder)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.filename
        # Atomic: a reader (or a run killed mid-write) never sees half a file.
        write_json(path, histories_of(trainer), allow_nan=False)
        self.last_path = path

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}
