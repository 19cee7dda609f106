"""Run a measurement without side effects, and seeded RNG that leaves the caller's stream alone.

:func:`isolated` is the one guard every measurement, probe and intervention analysis runs under.
It snapshots everything a forward/backward pass of a user's own loss can touch and restores it
afterwards, so that a measurement is invisible to training by construction (not by trusting the
user's ``training_step``): parameter values and ``requires_grad``, ``.grad``, buffers (BatchNorm
running statistics, counters), the optimizers' state and hyperparameters, the CPU/CUDA, Python
and NumPy RNG streams, every module's train/eval mode, and plain ``bool``/``int``/``float``/``str``
attributes of every module (a step counter ``self.calls += 1``).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["forked_rng", "isolated", "module_device", "preserved_buffers", "side_effect_free"]

_PLAIN = (bool, int, float, str, type(None))


def module_device(model: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """The device of the first parameter or buffer of ``model``."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device(default)


def _cuda_indices(device: torch.device | None) -> list[int]:
    if device is not None and device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


@contextlib.contextmanager
def forked_rng(seed: int | None = None, device: torch.device | None = None) -> Iterator[None]:
    """Fork the global CPU (and CUDA) generators, optionally seed them, restore them on exit.

    Example::

        >>> import torch
        >>> before = torch.get_rng_state()
        >>> with forked_rng(seed=0):
        ...     _ = torch.randn(3)
        >>> torch.equal(before, torch.get_rng_state())
        True
    """
    devices = _cuda_indices(device)
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
            for index in devices:
                torch.cuda.default_generators[index].manual_seed(seed)
        yield


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (BatchNorm running statistics, counters) on exit.

    Restored through ``.data`` and only where changed, so autograd's version counters of the
    caller's tensors are not bumped: tensors saved for backward stay usable.
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, old in saved:
                if b.shape == old.shape and not torch.equal(b, old):
                    b.data.copy_(old)


@contextlib.contextmanager
def side_effect_free(model: nn.Module, seed: int | None = None) -> Iterator[None]:
    """Forwards for a measure: forked (and seeded) RNG, buffers restored, gradients enabled.

    The lighter guard the pure measures use around their own forward passes (dropout in train
    mode draws the same masks for every forward with the same ``seed``; BatchNorm in train mode
    leaves no trace); :func:`isolated` is the full guard of the callbacks.
    """
    with forked_rng(seed, module_device(model)), preserved_buffers(model), \
            torch.inference_mode(False), torch.enable_grad():
        yield


def _optimizer_snapshot(optimizer: torch.optim.Optimizer) -> tuple[dict, list[dict]]:
    state = {p: {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in s.items()}
             for p, s in optimizer.state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return state, groups


def _optimizer_restore(optimizer: torch.optim.Optimizer, snapshot: tuple[dict, list[dict]]) -> None:
    state, groups = snapshot
    optimizer.state.clear()
    for p, s in state.items():
        optimizer.state[p] = s
    for group, saved in zip(optimizer.param_groups, groups):
        group.update(saved)


@contextlib.contextmanager
def isolated(
    model: nn.Module,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    *,
    eval_mode: bool = True,
    seed: int | None = None,
) -> Iterator[None]:
    """Run the block without any lasting effect on ``model``, ``optimizers`` or the RNG streams.

    Inside, gradients are enabled (also under Lightning's ``inference_mode`` in validation) and,
    with ``eval_mode``, every module is in eval mode (BatchNorm uses its running statistics,
    dropout is off), as measurements of the network's function expect. ``seed`` seeds the forked
    global generators, so stochastic layers draw the same masks every time.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).train()
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> before = [p.clone() for p in net.state_dict().values()]
        >>> with isolated(net, [opt], eval_mode=False):
        ...     net(torch.randn(8, 3)).sum().backward()
        ...     opt.step()
        >>> all(torch.equal(a, b) for a, b in zip(before, net.state_dict().values()))
        True
        >>> net[0].weight.grad is None
        True
    """
    optimizers = list(optimizers)
    modes = [(m, m.training) for m in model.modules()]
    plain = [(m, {k: v for k, v in vars(m).items() if isinstance(v, _PLAIN)})
             for m in model.modules()]
    params = list({id(p): p for p in model.parameters()}.values())
    values = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    # The gradient tensors themselves are kept (DDP may hold views of them) and refilled.
    grads = [None if p.grad is None else (p.grad, p.grad.detach().clone()) for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    opt_state = [_optimizer_snapshot(o) for o in optimizers]
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with forked_rng(seed, module_device(model)), torch.inference_mode(False), \
                torch.enable_grad():
            if eval_mode:
                model.eval()
            yield
    finally:
        with torch.no_grad():
            for p, value, flag, grad in zip(params, values, flags, grads):
                if p.shape == value.shape:
                    p.data.copy_(value)  # through .data: autograd version counters untouched
                else:
                    p.data = value
                p.requires_grad_(flag)
                if grad is None:
                    p.grad = None
                else:
                    grad[0].copy_(grad[1])
                    p.grad = grad[0]
            for b, value in buffers:
                if b.shape == value.shape:
                    b.data.copy_(value)
                else:
                    b.data = value
        for o, snapshot in zip(optimizers, opt_state):
            _optimizer_restore(o, snapshot)
        for m, attrs in plain:
            for k, v in attrs.items():
                if vars(m).get(k, v) is not v:
                    setattr(m, k, v)
        for m, mode in modes:
            m.training = mode
        random.setstate(py_state)
        np.random.set_state(np_state)
