"""What a measurement measures: a probe batch, the module's own loss, and no side effects.

One mechanism that every measurement callback, intervention and the L2-ER mixin share:

* :func:`module_loss` finds the training loss of any LightningModule on a batch: a user's
  ``loss_fn(pl_module, batch)``, else the module's ``plasticity_loss(batch)``, else its own
  ``training_step`` with logging suppressed (returning a tensor or a dict with ``"loss"``). A
  manual-optimization module's ``training_step`` steps its optimizers, so it is never called:
  such a module needs ``plasticity_loss`` or ``loss_fn``.
* :class:`ProbeSource` / :func:`select_probe_batch` give a fixed probe batch: from a
  :class:`ContinualDataModule` the task's ``probe_batch``; otherwise as many training batches as
  ``probe_size`` needs (any batch structure), collected once. Under DDP each rank measures an
  equal shard; the examples that do not divide evenly are reported once, never dropped silently.
* :func:`measurement_context` runs a measurement under :func:`~lightning_plasticity.core.isolation.
  isolated`, with the trainer's optimizers: parameters, buffers, gradients, optimizer state, RNG
  streams, modes and plain attributes are exactly as before afterwards.
* :func:`find_head` runs the loss once with hooks and names the layer whose output the loss
  reads (the last trainable parameterised layer called).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from lightning_plasticity.core.batch import (
    batch_size,
    concat_batches,
    detach_clone,
    shard_batch,
    slice_batch,
)
from lightning_plasticity.core.isolation import forked_rng, isolated
from lightning_plasticity.core.layers import parameterised_layers
from lightning_plasticity.core.record import ForwardRecord, record_forward

#: ``loss_fn(pl_module, batch) -> scalar loss`` as a user may pass it to a callback.
ModuleLossFn = Callable[[pl.LightningModule, Any], Tensor]


class MeasurementSkipped(RuntimeError):
    """Raised by a measurement that cannot run on this model or batch (message says why)."""


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


def _call_training_step(module: nn.Module, batch: Any) -> Any:
    step = module.training_step
    try:
        positional = [p for p in inspect.signature(step).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        positional = [None, None]
    return step(batch, 0) if len(positional) >= 2 else step(batch)


def module_loss(pl_module: nn.Module, batch: Any, loss_fn: ModuleLossFn | None = None) -> Tensor:
    """The module's training loss on ``batch`` (see the module docstring for the order)."""
    name = type(pl_module).__name__
    if loss_fn is not None:
        out: Any = loss_fn(pl_module, batch)
    elif callable(getattr(pl_module, "plasticity_loss", None)):
        out = pl_module.plasticity_loss(batch)
    elif not getattr(pl_module, "automatic_optimization", True):
        raise MeasurementSkipped(
            f"{name} uses manual optimization, so its training_step steps the optimizer and "
            "cannot be run for a measurement; define plasticity_loss(batch) on the module or "
            "pass loss_fn=callable(pl_module, batch) to the callback")
    elif not callable(getattr(pl_module, "training_step", None)):
        raise MeasurementSkipped(f"{name} has no training_step; define plasticity_loss(batch) or "
                                 "pass loss_fn=callable(pl_module, batch)")
    else:
        # Instance attributes shadow the bound methods, so training_step's self.log calls are
        # swallowed instead of logging under the callback's hook.
        pl_module.log, pl_module.log_dict = _no_log, _no_log  # type: ignore[method-assign]
        try:
            out = _call_training_step(pl_module, batch)
        finally:
            del pl_module.log, pl_module.log_dict
    if isinstance(out, dict):
        out = out.get("loss")
    if not isinstance(out, Tensor) or out.numel() != 1:
        raise MeasurementSkipped(
            f"{name}'s loss on the probe batch is not a scalar tensor (got "
            f"{type(out).__name__}); define plasticity_loss(batch) on the module or pass "
            "loss_fn=callable(pl_module, batch) to the callback")
    return out.reshape(())


def loss_closure(loss_fn: ModuleLossFn | None) -> Callable[[nn.Module, Any], Tensor]:
    """``(module, batch) -> module_loss(module, batch, loss_fn)``: works on copies too."""
    return lambda module, batch: module_loss(module, batch, loss_fn)


def record_loss_pass(pl_module: nn.Module, batch: Any, loss_fn: ModuleLossFn | None = None,
                     modules: dict[str, nn.Module] | None = None, *,
                     keep_graph: bool = False) -> ForwardRecord:
    """One pass of the module's own loss recording every parameterised layer (or ``modules``)."""
    return record_forward(lambda: module_loss(pl_module, batch, loss_fn),
                          modules if modules is not None else parameterised_layers(pl_module),
                          keep_graph=keep_graph)


def find_head(record: ForwardRecord) -> str:
    """The name of the layer whose output the loss reads (see the module docstring)."""
    head = record.head()
    if head is None:
        raise MeasurementSkipped("no layer with trainable parameters was called by the loss")
    return head.name


@contextlib.contextmanager
def measurement_context(pl_module: pl.LightningModule,
                        trainer: pl.Trainer | None = None) -> Iterator[None]:
    """Run a measurement without any side effect (see the module docstring)."""
    optimizers = list(trainer.optimizers) if trainer is not None else []
    with isolated(pl_module, optimizers):
        yield


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


class ProbeSource:
    """A fixed probe batch of ``size`` examples from the training data, collected once.

    Without a ContinualDataModule the probe is the first ``size`` training examples: taken from
    a fresh iterator over the training dataloader (RNG forked, so training's own order is not
    affected), or, where that is not possible (persistent workers, a loader that cannot be
    iterated twice), from the training batches seen so far. Under DDP each rank collects from
    its own shard of the data.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.batch: Any = None
        self._seen: list[Any] = []
        self._seen_count = 0

    def observe(self, batch: Any) -> None:
        """Keep examples of a training batch until ``size`` are held."""
        if self.batch is not None or self._seen_count >= self.size:
            return
        n = batch_size(batch)
        if n is None:
            return
        take = min(n, self.size - self._seen_count)
        self._seen.append(detach_clone(slice_batch(batch, 0, take)))
        self._seen_count += take

    def _from_loader(self, trainer: pl.Trainer) -> Any:
        loader = _first_loader(getattr(trainer, "train_dataloader", None))
        if loader is None or (getattr(loader, "persistent_workers", False)
                              and getattr(loader, "num_workers", 0) > 0):
            return None
        batches, count = [], 0
        with forked_rng():
            for batch in loader:
                n = batch_size(batch)
                if n is None:
                    return None
                batch = trainer.strategy.batch_to_device(batch)
                take = min(n, self.size - count)
                batches.append(detach_clone(slice_batch(batch, 0, take)))
                count += take
                if count >= self.size:
                    break
        return concat_batches(batches) if batches else None

    def get(self, trainer: pl.Trainer) -> Any:
        if self.batch is not None:
            return self.batch
        batch = None
        with contextlib.suppress(Exception):  # any failure: fall back to the batches seen
            batch = self._from_loader(trainer)
        if batch is None:
            if not self._seen:
                raise MeasurementSkipped("no probe batch: no training batch has been seen yet")
            batch = concat_batches(self._seen)
            if self._seen_count < self.size:
                return batch  # not complete yet: later training batches add to it
        self.batch, self._seen = batch, []
        return batch


def select_probe_batch(trainer: pl.Trainer, pl_module: pl.LightningModule, size: int,
                       source: ProbeSource | None = None, sharded: bool = True,
                       note: Callable[[str], None] | None = None) -> Any:
    """A fixed probe batch of ``size`` examples, this rank's share of it when ``sharded``.

    With a :class:`ContinualDataModule` the examples are a pure function of the seed and task
    (``probe_batch``), so every rank draws the same ones; sharded, every rank takes an equal
    share and together they are the single-process probe (``n % world_size`` examples are left
    out and ``note`` says so once). Otherwise ``source`` gives this rank's probe from its own
    shard of the training data: sharded measures use ``size // world_size`` examples per rank;
    unsharded ones use rank 0's probe on every rank (broadcast), so that all ranks agree.
    """
    dm = trainer.datamodule
    world = trainer.world_size
    if dm is not None and callable(getattr(dm, "probe_batch", None)):
        batch = dm.probe_batch(size, device=pl_module.device)
        if not sharded or world <= 1:
            return batch
        shard, dropped = shard_batch(batch, trainer.global_rank, world)
        if dropped and note is not None:
            note(f"the probe batch of {batch_size(batch)} examples does not split evenly over "
                 f"{world} processes: {dropped} example(s) are left out; use a probe_size that "
                 f"is a multiple of {world}")
        return shard
    if source is None:
        raise MeasurementSkipped("no probe batch source")
    batch = source.get(trainer)
    if world <= 1:
        return batch
    if sharded:
        n = batch_size(batch) or 0
        per_rank = max(size // world, 1)
        if n < per_rank:
            raise MeasurementSkipped(f"only {n} probe examples on this rank")
        return slice_batch(batch, 0, per_rank)
    return trainer.strategy.broadcast(batch, src=0)


__all__ = [
    "MeasurementSkipped",
    "ModuleLossFn",
    "ProbeSource",
    "find_head",
    "loss_closure",
    "measurement_context",
    "module_loss",
    "record_loss_pass",
    "select_probe_batch",
]

