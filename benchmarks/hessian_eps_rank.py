"""Accuracy, error-bar coverage and cost of the Lanczos eps-rank estimate against dense counts.

Three 13-14k-parameter networks on sklearn's ``load_digits`` (offline), in float64, probe batch
of 512 images: MLPs 64-96-64-10 with tanh and with ReLU (13,098 parameters) and a small CNN
(two 3x3 convolutions with max-pooling, then 128-64-10; 13,706 parameters). Each is measured at
initialisation and after 200 Adam steps. For every state the exact eps-ranks come from the
dense Hessian (``method="dense"``, ``eigvalsh`` in float64, cached in ``--cache``), and the
``method="lanczos"`` estimate at its defaults (1,000 Hessian-vector products) runs for
``--seeds`` seeds at eps 1e-3 and 1e-2 (relative). Printed per case: the relative error, whether
the reported error bar (``error_estimate``, ~95%) covers the exact count, the products used and
the time against dense; at the end the mean relative error over all cases and the coverage.

Run: ``python benchmarks/hessian_eps_rank.py [--models tanh relu cnn] [--seeds 3]``
(the first run computes six dense Hessians: about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from lightning_plasticity.measures.hessian_spectrum import hessian_eps_rank


class _Image(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, 1, 8, 8)


def build(name: str) -> nn.Module:
    if name == "cnn":
        return nn.Sequential(_Image(), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 64), nn.ReLU(),
                             nn.Linear(64, 10))
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[name]
    return nn.Sequential(nn.Linear(64, 96), act(), nn.Linear(96, 64), act(), nn.Linear(64, 10))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tanh", "relu", "cnn"])
    parser.add_argument("--states", nargs="+", default=["init", "trained"],
                        choices=["init", "trained"])
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-3, 1e-2])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--num-matvecs", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cache", default="/tmp/lp_eps_rank_cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0), torch.tensor(y)
    batch = (X[:512], y[:512])
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = build(name)
        n = sum(p.numel() for p in model.parameters())
        for state in ("init", "trained"):
            if state not in args.states:
                continue
            if state == "trained":
                opt = torch.optim.Adam(model.parameters(), 1e-3)
                g = torch.Generator().manual_seed(1)
                for _ in range(args.steps):
                    idx = torch.randint(0, len(X), (64,), generator=g)
                    opt.zero_grad()
                    loss_fn(model, (X[idx], y[idx])).backward()
                    opt.step()
            file = cache / f"{name}_{state}.pt"
            if file.exists():
                saved = torch.load(file)
                ev, t_dense = saved["ev"], saved["seconds"]
            else:
                start = time.perf_counter()
                dense = hessian_eps_rank(model, loss_fn, batch, method="dense",
                                         max_dense_params=None, max_dense_memory_bytes=None)
                t_dense = time.perf_counter() - start
                ev = dense.eigenvalues
                torch.save({"ev": ev, "seconds": t_dense}, file)
            top = float(ev.abs().max())
            for eps in args.eps:
                exact = int((ev.abs() > eps * top).sum())
                for seed in range(args.seeds):
                    start = time.perf_counter()
                    r = hessian_eps_rank(model, loss_fn, batch, eps=eps, method="lanczos",
                                         num_matvecs=args.num_matvecs, seed=seed)
                    seconds = time.perf_counter() - start
                    err = (r.eps_rank - exact) / exact
                    covered = abs(r.eps_rank - exact) <= r.error_estimate
                    rows.append((name, state, eps, err, covered))
                    print(f"{name:4s} {state:7s} n={n} eps={eps:g} seed={seed}: "
                          f"{r.eps_rank:8.1f} +- {r.error_estimate:6.1f} vs exact {exact:5d}  "
                          f"err {100 * err:+6.2f}%  covered={covered}  {r.num_matvecs} HVPs "
                          f"({r.num_deflated} deflated)  {seconds:.1f}s = 1/"
                          f"{t_dense / seconds:.0f} of dense", flush=True)

    print("\nmodel state    eps     mean|err|  covered")
    for name in args.models:
        for state in args.states:
            for eps in args.eps:
                sel = [r for r in rows if r[:3] == (name, state, eps)]
                mean_err = 100 * statistics.mean(abs(r[3]) for r in sel)
                print(f"{name:5s} {state:8s} {eps:6g} {mean_err:8.2f}%  "
                      f"{sum(r[4] for r in sel)}/{len(sel)}")
    print(f"all: mean |relative error| {100 * statistics.mean(abs(r[3]) for r in rows):.2f}%, "
          f"error bar covers the exact count in {sum(r[4] for r in rows)}/{len(rows)} cases")


if __name__ == "__main__":
    main()
