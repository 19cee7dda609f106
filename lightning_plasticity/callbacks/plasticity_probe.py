"""``PlasticityProbeCallback``: Lyle et al. 2023's plasticity, measured on a copy."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning.pytorch as pl
from torch import Tensor, nn

from lightning_plasticity.callbacks.measurement import MeasurementCallback
from lightning_plasticity.callbacks.probe import ModuleLossFn
from lightning_plasticity.core.initialization import fresh_initialization
from lightning_plasticity.measures.plasticity_probe import PlasticityProbe, plasticity_probe


@contextlib.contextmanager
def _without_trainer(module: nn.Module) -> Iterator[nn.Module]:
    # Deep-copying a LightningModule would also copy its trainer; detach it for the copy.
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        module._trainer = None
    try:
        yield module
    finally:
        if trainer is not None:
            module._trainer = trainer


class PlasticityProbeCallback(MeasurementCallback):
    """Plasticity as Lyle et al. 2023 define it ("Understanding plasticity in neural networks").

    At task boundaries the network is copied and the copy is trained for ``steps`` steps with a
    fixed optimizer on a fresh random-target regression (or random labels) over the probe
    inputs; the final loss measures how well the network can still fit a new target. The same
    procedure on a fresh initialisation of the same architecture gives the reference. Training
    continues from the untouched network: only copies are trained. Deterministic given ``seed``
    (see :func:`lightning_plasticity.measures.plasticity_probe.plasticity_probe`).

    The network's output is the head output of the module's own loss pass (the last trainable
    layer that ``loss_fn``, ``plasticity_loss`` or ``training_step`` calls), so no ``forward``
    is needed and any batch structure works; the copy is trained against random targets on
    that output. Under DDP every rank probes the whole probe batch (the same
    result everywhere, no collective).

    Logged under ``plasticity/`` (the keys of :meth:`PlasticityProbe.scalars`): ``final_loss``,
    ``initial_loss``, ``loss_reduction``, ``loss_ratio`` and, with ``compare_fresh``,
    ``fresh_initial_loss``, ``fresh_final_loss``, ``fresh_loss_reduction`` and
    ``relative_final_loss`` (final over fresh final; > 1 means the trained network fits new
    targets worse than a fresh one).

    Args:
        steps: optimizer steps of each probe fit.
        lr: probe learning rate.
        optimizer: ``"adam"`` or ``"sgd"``.
        target: ``"regression"`` (random Gaussian targets) or ``"labels"`` (random labels).
        compare_fresh: also fit a fresh initialisation.
        seed: seed of the targets and of the fresh initialisation.
        probe_size, loss_fn, on_task_start, on_task_end, every_n_train_steps, every_n_tasks: see
            :class:`MeasurementCallback`.

    Example::

        >>> import tempfile
        >>> from functools import partial
        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> from lightning_plasticity.callbacks import PlasticityProbeCallback
        >>> from lightning_plasticity.data import ContinualDataModule
        >>> from lightning_plasticity.models import MLP, ContinualClassifier
        >>> _ = torch.manual_seed(0)
        >>> dm = ContinualDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=2,
        ...                          batch_size=16, val_size=32)
        >>> model = ContinualClassifier(network=partial(MLP, width=16))
        >>> cb = PlasticityProbeCallback(steps=10, probe_size=32)
        >>> trainer = Trainer(max_steps=4, accelerator="cpu", logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False, default_root_dir=tempfile.mkdtemp(),
        ...                   callbacks=[cb])
        >>> trainer.fit(model, datamodule=dm)
        >>> [(h["task"], h["event"]) for h in cb.history]  # at the start of every task
        [(0, 'task_start'), (1, 'task_start')]
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("plasticity/"))[:3]
        ['plasticity/final_loss', 'plasticity/fresh_final_loss', 'plasticity/fresh_initial_loss']
        >>> bool(trainer.callback_metrics["plasticity/loss_reduction"] > 0)
        True
    """

    prefix = "plasticity"
    shard_probe = False

    def __init__(
        self,
        steps: int = 100,
        lr: float = 1e-3,
        optimizer: Literal["adam", "sgd"] = "adam",
        target: Literal["regression", "labels"] = "regression",
        compare_fresh: bool = True,
        seed: int = 0,
        probe_size: int = 256,
        loss_fn: ModuleLossFn | None = None,
        on_task_start: bool = True,
        on_task_end: bool = False,
        every_n_train_steps: int | None = None,
        every_n_tasks: int = 1,
    ) -> None:
        super().__init__(probe_size=probe_size, loss_fn=loss_fn, on_task_start=on_task_start,
                         on_task_end=on_task_end, every_n_train_steps=every_n_train_steps,
                         every_n_tasks=every_n_tasks)
        if steps < 1 or lr <= 0:
            raise ValueError(f"PlasticityProbeCallback: need steps >= 1 and lr > 0; got {steps}, "
                             f"{lr}.")
        if optimizer not in ("adam", "sgd") or target not in ("regression", "labels"):
            raise ValueError("PlasticityProbeCallback: optimizer must be adam or sgd and target "
                             f"regression or labels; got {optimizer!r}, {target!r}.")
        self.steps, self.lr, self.optimizer, self.target = steps, lr, optimizer, target
        self.compare_fresh, self.seed = compare_fresh, seed

    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "steps": self.steps, "target": self.target}

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                reduce: Callable[[Tensor], Tensor] | None) -> PlasticityProbe:
        model = self.head_output(pl_module, batch)
        with _without_trainer(pl_module):
            fresh = fresh_initialization(model, self.seed) if self.compare_fresh else None
            return plasticity_probe(model, batch, steps=self.steps, lr=self.lr,
                                    optimizer=self.optimizer, target=self.target,
                                    seed=self.seed, fresh_model=fresh)
