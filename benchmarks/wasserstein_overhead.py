"""Cost of the Wasserstein init penalty per training step, on the seed experiments' MLP.

An MLP 784-100-100-10 (ReLU, 89,610 parameters) trained by Adam on random MNIST-shaped batches
of 64, one torch thread: the time per step (forward, loss, backward, Adam) plain, with
``wasserstein_init_penalty`` sorting every tensor by ``torch.sort`` (the plain function), and
with the orders remembered between steps (``orders={}``, what ``WassersteinInitRegularizer``
does: a NumPy re-sort of nearly sorted values). The three run interleaved for ``--repeats``
rounds of ``--steps`` steps; the best round of each is compared. Target: <= 1.5x plain.

Run: ``python benchmarks/wasserstein_overhead.py [--steps 200] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_plasticity.regularizers.penalties import wasserstein_init_penalty


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))

    def run(mode: str) -> float:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                              nn.Linear(100, 10))
        params = list(model.parameters())
        anchors = [p.detach().flatten().sort().values.view(p.shape) for p in params]
        opt = torch.optim.Adam(params, lr=1e-3)
        orders: dict[int, torch.Tensor] = {}
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = F.cross_entropy(model(x), y)
            if mode == "torch.sort":
                loss = loss + 1e-2 * wasserstein_init_penalty(params, anchors,
                                                              anchors_sorted=True)
            elif mode == "remembered orders":
                loss = loss + 1e-2 * wasserstein_init_penalty(params, anchors,
                                                              anchors_sorted=True,
                                                              orders=orders)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / args.steps

    modes = ["plain", "torch.sort", "remembered orders"]
    best = {m: float("inf") for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            best[m] = min(best[m], run(m))
    print(f"MLP 784-100-100-10 (89,610 parameters), batch 64, Adam, 1 thread, best of "
          f"{args.repeats} x {args.steps} steps")
    for m in modes:
        print(f"{m:18s} {1e3 * best[m]:7.2f} ms/step  {best[m] / best['plain']:5.2f}x plain")


if __name__ == "__main__":
    main()
