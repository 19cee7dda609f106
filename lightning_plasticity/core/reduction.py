"""Cross-rank reduction declared by the statistics themselves.

As torchmetrics declares ``add_state(..., dist_reduce_fx="sum")``, a statistics dataclass
declares how each tensor field combines across ranks with :func:`stat`; :func:`reduce_stats`
then reduces any such object (or a dict of them) with one collective per reduction op, so the
shell never needs to know a measure's fields. Sums of sufficient statistics over equal or
unequal shards give exactly the single-process statistics of the union.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import field, fields, is_dataclass, replace
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

__all__ = ["ReduceOp", "Reducer", "reduce_stats", "stat"]

ReduceOp = Literal["sum", "mean"]
#: ``reducer(flat_tensor, op) -> reduced tensor``: an all-reduce across ranks
Reducer = Callable[[Tensor, ReduceOp], Tensor]
T = TypeVar("T")


def stat(dist_reduce_fx: ReduceOp = "sum") -> Any:
    """A dataclass field that :func:`reduce_stats` combines across ranks with ``dist_reduce_fx``.

    Example::

        >>> import torch
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Counts:
        ...     name: str
        ...     total: torch.Tensor = stat("sum")
        >>> two_ranks = lambda t, op: 2 * t if op == "sum" else t  # stands in for all_reduce
        >>> reduce_stats(Counts("a", torch.tensor([1.0, 2.0])), two_ranks).total
        tensor([2., 4.])
    """
    return field(metadata={"dist_reduce_fx": dist_reduce_fx})


def _reduced_fields(obj: Any) -> list[tuple[str, ReduceOp]]:
    if not is_dataclass(obj):
        raise TypeError(f"reduce_stats needs dataclass statistics, got {type(obj).__name__}.")
    return [(f.name, f.metadata["dist_reduce_fx"]) for f in fields(obj)
            if "dist_reduce_fx" in f.metadata]


def reduce_stats(stats: T, reducer: Reducer | None) -> T:
    """``stats`` (a statistics dataclass or a dict of them) reduced across ranks.

    Every declared field of every object goes into one flat float64 tensor per op, so the cost
    is one collective per op whatever the number of layers; every rank must hold the same
    fields with the same shapes. ``reducer=None`` (one process) returns ``stats`` unchanged.
    """
    if reducer is None:
        return stats
    objects = list(stats.values()) if isinstance(stats, Mapping) else [stats]
    parts: dict[str, list[tuple[int, str, Tensor]]] = {}
    for i, obj in enumerate(objects):
        for name, op in _reduced_fields(obj):
            parts.setdefault(op, []).append((i, name, getattr(obj, name)))
    updates: list[dict[str, Tensor]] = [{} for _ in objects]
    for op, entries in parts.items():
        device = entries[0][2].device
        flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64)
                          for _, _, t in entries])
        flat = reducer(flat, op)  # type: ignore[arg-type]
        offset = 0
        for i, name, t in entries:
            updates[i][name] = flat[offset:offset + t.numel()].reshape(t.shape).to(
                device=t.device, dtype=t.dtype)
            offset += t.numel()
    reduced = [replace(obj, **upd) for obj, upd in zip(objects, updates, strict=True)]
    if isinstance(stats, Mapping):
        return type(stats)(zip(stats.keys(), reduced, strict=True))  # type: ignore[call-arg]
    return reduced[0]
