"""Empirical NTK: per-layer closed form vs ``torch.func`` Jacobian contraction.

Times :func:`lightning_plasticity.measures.entk.entk` with ``method="per_layer"`` (one forward,
``C`` backward passes, Gram products per layer) against ``method="jacobian"`` (``jacrev`` of
``functional_call``, then ``J J^T``) on an MLP 784-256-256-10 and a batch of 64, and prints the
speed ratio and the largest absolute difference between the two kernels. The per-layer formula
is expected to be at least 20x faster here.

Usage::

    python benchmarks/entk_per_layer_vs_jacobian.py [--batch 64] [--repeats 3] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_plasticity.measures.entk import entk


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    fn()  # warm-up (allocator, torch.func tracing caches)
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    h = args.hidden
    model = nn.Sequential(
        nn.Linear(784, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10)
    ).to(device=args.device, dtype=dtype)
    x = torch.randn(args.batch, 784, device=args.device, dtype=dtype)
    num_params = sum(p.numel() for p in model.parameters())

    t_layer, k_layer = _time(lambda: entk(model, x, method="per_layer"), args.repeats)
    t_jac, k_jac = _time(lambda: entk(model, x, method="jacobian"), args.repeats)
    diff = (k_layer.kernel - k_jac.kernel).abs().max().item()
    scale = k_jac.kernel.abs().max().item()

    print(
        f"MLP 784-{h}-{h}-10 ({num_params} params), batch {args.batch}, kernel "
        f"{tuple(k_layer.kernel.shape)}, {args.dtype} on {args.device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"per_layer: {t_layer * 1e3:9.1f} ms")
    print(f"jacobian:  {t_jac * 1e3:9.1f} ms")
    print(f"speed ratio jacobian / per_layer: {t_jac / t_layer:.1f}x")
    print(f"max |K_per_layer - K_jacobian| = {diff:.3e} (max |K| = {scale:.3e})")
    print(
        f"summed-kernel rank {k_layer.rank} / {args.batch}, condition number "
        f"{k_layer.condition_number:.3e}, interference {k_layer.interference:.4f}"
    )


if __name__ == "__main__":
    main()
