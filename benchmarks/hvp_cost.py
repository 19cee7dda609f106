"""Cost of a Hessian-vector product relative to a forward+backward pass.

Prints, for an MLP on a digits-sized batch, the time per product of
:class:`~lightning_plasticity.measures.hvp.HessianVectorProduct` (graph built once, reused by
double backward; single and batched products) and of ``torch.func`` forward-over-reverse
(``jvp`` of ``grad``, which re-runs the forward for every product), each divided by the time
of one forward+backward pass, and whether a batched product (one vmapped double backward for
``k`` vectors) is faster per vector than single ones on this hardware (``HessianVectorProduct``
times both on its first block and keeps the faster). Target: reused HVP / (forward+backward)
<= 1.4.

Run: ``python benchmarks/hvp_cost.py [--threads 1] [--batch 512] [--repeats 7]``; the seed
experiments' MLP: ``--input 784 --hidden 100 100 --activation relu --batch 256``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

from lightning_plasticity.measures.hvp import HessianVectorProduct


def timed(fn: Callable[[], object], number: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of ``number`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--hidden", type=int, nargs="+", default=[100, 64])
    parser.add_argument("--input", type=int, default=64)
    parser.add_argument("--activation", choices=["tanh", "relu"], default="tanh")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--number", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    dims = [args.input, *args.hidden, 10]
    act = nn.Tanh if args.activation == "tanh" else nn.ReLU
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out), act()]
    model = nn.Sequential(*layers[:-1])
    x = torch.randn(args.batch, args.input)
    y = torch.randint(0, 10, (args.batch,))
    params = list(model.parameters())
    n = sum(p.numel() for p in params)

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    def forward_backward() -> None:
        torch.autograd.grad(loss_fn(model, (x, y)), params)

    t_fb = timed(forward_backward, args.number, args.repeats)
    t_build = timed(lambda: HessianVectorProduct(model, loss_fn, (x, y)).release(), args.number,
                    args.repeats)

    hvp = HessianVectorProduct(model, loss_fn, (x, y))
    v = torch.randn(n)
    t_hvp = timed(lambda: hvp.matvec(v), args.number, args.repeats)
    batched = {}
    for k in (4, 8, 32):
        V = torch.randn(n, k)
        batched[k] = timed(lambda V=V: hvp._matmat_batched(V), max(1, args.number // 4),
                           args.repeats) / k

    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def flat_loss(flat: torch.Tensor) -> torch.Tensor:
        chunks = flat.split([s.numel() for s in shapes])
        state = {nm: c.view(s) for nm, c, s in zip(names, chunks, shapes)}
        return F.cross_entropy(functional_call(model, state, (x,)), y)

    def forward_over_reverse() -> None:
        jvp(grad(flat_loss), (theta,), (v,))

    t_for = timed(forward_over_reverse, args.number, args.repeats)
    ref = jvp(grad(flat_loss), (theta,), (v,))[1]
    err = float((ref - hvp.matvec(v)).abs().max() / ref.abs().max())

    print(f"MLP {dims}, {n} parameters, batch {args.batch}, {args.threads} thread(s)")
    print(f"{'measurement':44s} {'ms':>9s} {'/ fwd+bwd':>10s}")
    rows = [
        ("forward+backward (autograd.grad)", t_fb),
        ("engine build (forward + create_graph grad)", t_build),
        ("HVP, engine reused (matvec)", t_hvp),
        ("HVP, engine reused, batched x4 (per vector)", batched[4]),
        ("HVP, engine reused, batched x8 (per vector)", batched[8]),
        ("HVP, engine reused, batched x32 (per vector)", batched[32]),
        ("torch.func forward-over-reverse (per HVP)", t_for),
    ]
    for label, t in rows:
        print(f"{label:44s} {1e3 * t:9.3f} {t / t_fb:10.2f}")
    best = min(batched, key=batched.get)
    print(f"batched x{best} / single per vector = {batched[best] / t_hvp:.2f} "
          f"({'batched' if batched[best] < t_hvp else 'single'} products are faster here)")
    print(f"reused HVP / fwd+bwd = {t_hvp / t_fb:.2f} (target <= 1.4); "
          f"forward-over-reverse / reused HVP = {t_for / t_hvp:.2f}; "
          f"max relative difference between the two = {err:.1e}")


if __name__ == "__main__":
    main()
