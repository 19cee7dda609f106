"""Dense vs Lanczos (deflated SLQ) Hessian eps-rank on a ~13.6k-parameter MLP.

An MLP 64-100-64-10 (13,614 parameters) on sklearn's ``load_digits`` (offline), probe batch
of 512 images, measured at initialisation and after 200 Adam steps. For each state it prints
the exact eps-rank (``method="dense"``: full Hessian by HVPs + float64 ``eigvalsh``) and the
``method="lanczos"`` estimate with the default settings for several seeds, with the relative
error and the time ratio. Target: mean relative error <= 5% at <= 1/15 of the dense time.

Run: ``python benchmarks/hessian_eps_rank.py [--activation tanh|relu] [--seeds 3]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from lightning_plasticity.measures.hessian_spectrum import hessian_eps_rank


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activation", choices=["tanh", "relu"], default="tanh")
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--extra-eps", type=float, nargs="*", default=[1e-2],
                        help="further thresholds to report (exact counts are free from dense)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    act = nn.Tanh if args.activation == "tanh" else nn.ReLU
    model = nn.Sequential(nn.Linear(64, 100), act(), nn.Linear(100, 64), act(),
                          nn.Linear(64, 10))
    n = sum(p.numel() for p in model.parameters())
    probe = torch.randperm(len(X))[: args.batch]
    batch = (X[probe], y[probe])
    print(f"MLP 64-100-64-10 ({args.activation}), {n} parameters, probe batch {args.batch}, "
          f"{args.threads} thread(s); eps={args.eps:g} relative to |lambda_max|")

    rows = []
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for state in ("init", f"after {args.steps} Adam steps"):
        if state != "init":
            g = torch.Generator().manual_seed(1)
            for _ in range(args.steps):
                idx = torch.randint(0, len(X), (64,), generator=g)
                loss = loss_fn(model, (X[idx], y[idx]))
                opt.zero_grad()
                loss.backward()
                opt.step()
        start = time.perf_counter()
        dense = hessian_eps_rank(model, loss_fn, batch, eps=args.eps, method="dense",
                                 max_dense_params=None, max_dense_memory_bytes=None)
        t_dense = time.perf_counter() - start
        ev = dense.eigenvalues
        top = float(ev.abs().max())
        print(f"\n[{state}] loss {dense.loss:.4f}, lambda_max {dense.top_eigenvalue:.4g}, "
              f"dense {t_dense:.1f}s; exact eps-ranks: " + ", ".join(
                  f"{e:g}: {int((ev.abs() > e * top).sum())}"
                  for e in [args.eps, *args.extra_eps]))
        for eps in [args.eps, *args.extra_eps]:
            exact = int((ev.abs() > eps * top).sum())
            errs, times = [], []
            for seed in range(args.seeds):
                start = time.perf_counter()
                r = hessian_eps_rank(model, loss_fn, batch, eps=eps, method="lanczos", seed=seed)
                times.append(time.perf_counter() - start)
                errs.append((r.eps_rank - exact) / exact)
                print(f"  eps {eps:g} seed {seed}: lanczos {r.eps_rank:8.1f} "
                      f"(+- {r.error_estimate:6.1f}) vs dense {exact:6d}: "
                      f"rel. error {errs[-1]:+.3f}, {times[-1]:.1f}s, "
                      f"{r.num_matvecs} HVPs, {r.eigenvalues.numel()} deflated")
            rows.append((state, eps, exact, statistics.mean(abs(e) for e in errs),
                         max(abs(e) for e in errs), t_dense, statistics.mean(times)))

    print("\nstate                     eps     dense   mean|err|  max|err|  dense s  lanczos s"
          "  time ratio")
    for state, eps, exact, mean_err, max_err, t_d, t_l in rows:
        print(f"{state:24s} {eps:6g} {exact:8d} {100 * mean_err:9.2f}% {100 * max_err:8.2f}% "
              f"{t_d:8.1f} {t_l:10.1f}   1/{t_d / t_l:.1f}")


if __name__ == "__main__":
    main()
