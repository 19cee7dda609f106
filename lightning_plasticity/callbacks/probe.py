"""What a measurement callback measures: a probe batch, the module's loss, and a clean slate.

* :func:`module_loss` finds the training loss of any LightningModule on a batch: a user's
  ``loss_fn(pl_module, batch)``, else the module's ``plasticity_loss(batch)``, else its own
  ``training_step`` with logging suppressed (returning a tensor or a dict with ``"loss"``).
* :func:`select_probe_batch` takes a fixed batch of the current task from a
  :class:`ContinualDataModule`, or the first training batch otherwise, and this rank's shard of it.
* :func:`measurement_context` runs a measurement without side effects: eval mode (so BatchNorm uses
  its running statistics and dropout is off, and no running statistic changes), gradients enabled
  even inside validation's ``inference_mode``, and parameters' ``.grad``, every module's mode and
  the torch RNG states restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor

#: ``loss_fn(pl_module, batch) -> scalar loss`` as a user may pass it to a callback.
ModuleLossFn = Callable[[pl.LightningModule, Any], Tensor]


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


def module_loss(pl_module: pl.LightningModule, batch: Any,
                loss_fn: ModuleLossFn | None = None) -> Tensor:
    """The module's training loss on ``batch`` (see the module docstring for the order)."""
    if loss_fn is not None:
        out: Any = loss_fn(pl_module, batch)
    elif callable(getattr(pl_module, "plasticity_loss", None)):
        out = pl_module.plasticity_loss(batch)
    else:
        # Instance attributes shadow the bound methods, so training_step's self.log calls are
        # swallowed instead of logging under the callback's hook.
        pl_module.log, pl_module.log_dict = _no_log, _no_log  # type: ignore[method-assign]
        try:
            out = pl_module.training_step(batch, 0)
        finally:
            del pl_module.log, pl_module.log_dict
    if isinstance(out, dict):
        out = out.get("loss")
    if not isinstance(out, Tensor) or out.numel() != 1:
        raise TypeError(
            f"{type(pl_module).__name__}'s loss on the probe batch is not a scalar tensor "
            f"(got {type(out).__name__}). Define plasticity_loss(batch) on the module or pass "
            "loss_fn=callable(pl_module, batch) to the callback."
        )
    return out.reshape(())


def shard(batch: Any, rank: int, world_size: int) -> Any:
    """This rank's equal share of every tensor's first dimension (the remainder is dropped)."""
    def cut(t: Any) -> Any:
        if not isinstance(t, Tensor) or t.dim() == 0:
            return t
        size = t.shape[0] // world_size
        return t[rank * size:(rank + 1) * size]

    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(t) for t in batch)
    if isinstance(batch, dict):
        return {k: cut(v) for k, v in batch.items()}
    return cut(batch)


def select_probe_batch(trainer: pl.Trainer, pl_module: pl.LightningModule, size: int,
                       fallback: Any = None, sharded: bool = True) -> Any:
    """A fixed probe batch of ``size`` examples of the current task, this rank's shard of it.

    With a :class:`ContinualDataModule` the examples are a pure function of the seed and task
    (``probe_batch``), so every rank draws the same ones and takes its own shard; the shards
    together are the single-process probe batch (``sharded=False``: every rank gets all of
    it). Otherwise ``fallback`` (the first training
    batch, which a distributed sampler has already sharded) is used.
    """
    dm = trainer.datamodule
    if dm is not None and callable(getattr(dm, "probe_batch", None)):
        batch = dm.probe_batch(size, device=pl_module.device)
        return shard(batch, trainer.global_rank, trainer.world_size) if sharded else batch
    if fallback is None:
        raise RuntimeError(
            "No probe batch: use a ContinualDataModule or let the callback see a training batch "
            "before it measures.")
    return move_data_to_device(fallback, pl_module.device)


def first_examples(batch: Any, size: int) -> Any:
    """The first ``size`` examples of a batch, detached and cloned (kept as a fixed probe)."""
    def cut(t: Any) -> Any:
        return t[:size].detach().clone() if isinstance(t, Tensor) and t.dim() > 0 else t

    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(t) for t in batch)
    if isinstance(batch, dict):
        return {k: cut(v) for k, v in batch.items()}
    return cut(batch)


@contextlib.contextmanager
def measurement_context(pl_module: pl.LightningModule) -> Iterator[None]:
    """Run a measurement without changing modes, gradients or RNG streams (see module doc)."""
    modes = {m: m.training for m in pl_module.modules()}
    grads = {p: p.grad for p in pl_module.parameters()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        pl_module.eval()
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode
        for param, grad in grads.items():
            param.grad = grad
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
