"""Generic batches: any nesting of tuples, lists, dicts and tensors (torch's pytree).

A batch's *examples* run along dim 0 of every tensor leaf whose first dimension equals the batch
size (the size of the first tensor leaf with ``dim() > 0``). Other leaves (scalars, strings,
tensors of another length such as a shared vocabulary) are passed through unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["batch_size", "concat_batches", "detach_clone", "index_batch", "shard_batch",
           "slice_batch", "tensor_leaves", "usable"]


def tensor_leaves(batch: Any) -> list[Tensor]:
    """Every tensor in ``batch``, in pytree order."""
    return [leaf for leaf in pytree.tree_leaves(batch) if isinstance(leaf, Tensor)]


def batch_size(batch: Any) -> int | None:
    """Number of examples: the first dimension of the first tensor leaf (None if none).

    Example::

        >>> import torch
        >>> batch_size({"image": torch.zeros(5, 3), "label": torch.zeros(5)})
        5
    """
    for leaf in tensor_leaves(batch):
        if leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def _map_examples(batch: Any, fn: Any) -> Any:
    n = batch_size(batch)

    def cut(leaf: Any) -> Any:
        if isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == n:
            return fn(leaf)
        return leaf

    return pytree.tree_map(cut, batch)


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of every per-example tensor of ``batch``.

    Example::

        >>> import torch
        >>> x, y = torch.arange(6.).reshape(3, 2), torch.tensor([0, 1, 2])
        >>> slice_batch((x, y, "meta"), 1, 3)[1]
        tensor([1, 2])
    """
    return _map_examples(batch, lambda t: t[start:stop])


def index_batch(batch: Any, index: Tensor) -> Any:
    """The examples ``index`` (a 1-D index tensor) of every per-example tensor."""
    return _map_examples(batch, lambda t: t[index.to(t.device)])


def detach_clone(batch: Any) -> Any:
    """A detached copy of every tensor (a normal tensor even if made in inference mode)."""
    return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, batch)


def usable(batch: Any) -> Any:
    """The batch with inference-mode tensors cloned (they cannot be saved for backward)."""
    return pytree.tree_map(
        lambda t: t.clone() if isinstance(t, Tensor) and t.is_inference() else t, batch)


def concat_batches(batches: Sequence[Any]) -> Any:
    """Concatenate batches of the same structure along the example dimension.

    Per-example tensors are concatenated; every other leaf is taken from the first batch.

    Example::

        >>> import torch
        >>> b = concat_batches([{"x": torch.zeros(2, 3)}, {"x": torch.ones(4, 3)}])
        >>> b["x"].shape
        torch.Size([6, 3])
    """
    if not batches:
        raise ValueError("concat_batches needs at least one batch.")
    if len(batches) == 1:
        return batches[0]
    flat = [pytree.tree_flatten(b) for b in batches]
    spec = flat[0][1]
    for _, other in flat[1:]:
        if other != spec:
            raise ValueError("cannot concatenate batches of different structure.")
    sizes = [batch_size(b) for b in batches]
    out = []
    for i, leaf in enumerate(flat[0][0]):
        if isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == sizes[0]:
            parts = [leaves[i] for leaves, _ in flat]
            if all(isinstance(p, Tensor) and p.dim() > 0 and p.shape[1:] == leaf.shape[1:]
                   for p in parts):
                out.append(torch.cat([p.to(leaf.device) for p in parts]))
                continue
        out.append(leaf)
    return pytree.tree_unflatten(out, spec)


def shard_batch(batch: Any, rank: int, world_size: int) -> tuple[Any, int]:
    """This rank's equal share of the examples, and how many examples no rank gets.

    Equal shards keep cross-rank means exact (every rank's mean has the same weight); the
    ``n % world_size`` examples left over are returned as a count so that the caller can say so.

    Example::

        >>> import torch
        >>> shard, dropped = shard_batch(torch.arange(7), rank=1, world_size=2)
        >>> shard, dropped
        (tensor([3, 4, 5]), 1)
    """
    n = batch_size(batch)
    if n is None or world_size <= 1:
        return batch, 0
    size = n // world_size
    if size == 0:
        raise ValueError(f"a probe batch of {n} examples cannot be split over {world_size} "
                         "ranks; use a probe_size of at least the number of processes.")
    return slice_batch(batch, rank * size, (rank + 1) * size), n - size * world_size
