"""Top-k Hessian eigenvalues: ours vs curvlinops + ARPACK vs PyHessian, against a dense truth.

Compares, on one model and one probe batch, the ``k`` (default 20) largest Hessian eigenvalues
computed by

* **ours (torch)**: :func:`lightning_plasticity.measures.hessian_spectrum.hessian_eigenvalues`
  with ``which="LA"`` (Lanczos with full reorthogonalisation over
  :class:`~lightning_plasticity.measures.hvp.HessianVectorProduct`, which builds the gradient
  graph once and reuses it for every product);
* **ours (scipy)**: the same with ``backend="scipy"`` (ARPACK ``eigsh`` over our products);
* **curvlinops + eigsh**: ``curvlinops.HessianLinearOperator(...).to_scipy()`` wrapped by
  ``scipy.sparse.linalg.eigsh(k, which="LA")`` (each product recomputes the forward and backward
  pass, forward-over-reverse with ``torch.func``), once with eigsh's default ``tol=0`` (machine
  precision of the operator's float64 dtype) and once with our tolerance (``--eigsh-tols``);
* **PyHessian**: ``pyhessian.hessian(...).eigenvalues(top_n=k)``, power iteration with
  deflation (per eigenvalue at most ``maxIter=100`` products, stopped when the Rayleigh quotient
  changes by less than ``tol=1e-3`` relative; both are PyHessian's defaults).

The model is an MLP ``64-H-H-10`` (tanh) on scikit-learn's bundled ``load_digits`` (no
download), trained for 200 Adam steps (``--train-steps``) so that the spectrum is that of a
network in training rather than at initialisation; the probe batch is a fixed, seeded subset of
the digits (cross-entropy, mean reduction). All timed runs are in float32. Their eigenvalues are
compared with the truth: the dense float64 Hessian of the same parameters on the same batch (one
exact Hessian-vector product per column, symmetrised) and ``torch.linalg.eigvalsh``.

For each method it prints the wall time (best of ``--repeats`` after one warm-up, methods
interleaved so that all see the same machine load, one thread), the time ratio to ours
(torch), the number of Hessian-vector products (counted by wrapping the reference's product
function), the largest relative error of the top-``k`` eigenvalues (each method's values sorted
in descending order and matched by rank) and the largest error relative to ``lambda_max``. For
the ARPACK-based methods ``eigsh`` gets the same seeded start vector and default ``ncv``;
``sqrt(eps)`` of float32 (3.5e-4) is our default relative residual tolerance in float32. Our
product counts include ``k`` products that recompute exact residuals.

The references are imported lazily and are not dependencies of the package; a missing one is
skipped with the command that installs it::

    .venv/bin/pip install curvlinops-for-pytorch pyhessian

Usage::

    .venv/bin/python benchmarks/top_eigenvalues_vs_references.py
    .venv/bin/python benchmarks/top_eigenvalues_vs_references.py --per-eigenvalue --repeats 5
    .venv/bin/python benchmarks/top_eigenvalues_vs_references.py --hidden 16  # quick check

The dense truth dominates the run time (``O(n)`` products and an ``O(n^3)`` eigendecomposition
for ``n`` parameters): with the default ``--hidden 64`` (8,970 parameters) the whole script
took 1.5-2.5 minutes on two shared CPU cores, 80-115 s of it the dense truth; ``--hidden 16``
(1,482 parameters) takes about 20 s.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_plasticity.measures.hessian_spectrum import hessian_eigenvalues
from lightning_plasticity.measures.hvp import HessianVectorProduct

Batch = tuple[Tensor, Tensor]
PIP = ".venv/bin/pip install"


@dataclass
class Run:
    """One method's eigenvalues and cost.

    Attributes:
        eigenvalues: ``(k,)`` float64, descending.
        num_hvps: Hessian-vector products used, or ``None`` if unknown.
        note: Anything the table should mention (e.g. unconverged pairs).
    """

    eigenvalues: Tensor
    num_hvps: int | None
    note: str = ""


@dataclass
class Method:
    """A method under comparison: names, the package version and a zero-argument runner."""

    name: str
    short: str  # column header of the per-eigenvalue table
    version: str
    run: Callable[[], Run]


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    """Mean cross-entropy of ``model`` on ``batch`` (the convention of our measures)."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_problem(hidden: int, batch_size: int, train_steps: int, seed: int) -> tuple[
    nn.Module, Batch
]:
    """Build the float32 MLP, train it briefly on the digits and pick the probe batch.

    Args:
        hidden: Width of the two hidden layers.
        batch_size: Size of the probe batch.
        train_steps: Adam steps (minibatches of 64) before measuring.
        seed: Seed of the initialisation, the training order and the probe batch.

    Returns:
        The model (float32, eval mode) and the probe batch ``(x, y)``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_all = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y_all = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
        nn.Linear(hidden, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(train_steps):
        idx = torch.randint(len(x_all), (64,), generator=gen)
        opt.zero_grad()
        loss_fn(model, (x_all[idx], y_all[idx])).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    probe = torch.randperm(len(x_all), generator=gen)[:batch_size]
    return model, (x_all[probe], y_all[probe])


def dense_top_eigenvalues(model: nn.Module, batch: Batch, k: int) -> tuple[Tensor, Tensor]:
    """The float64 truth: dense Hessian by exact products, then ``torch.linalg.eigvalsh``.

    Args:
        model: The float32 model (copied to float64; the copy has the same parameter values).
        batch: The float32 probe batch (converted to float64).
        k: Number of top eigenvalues returned.

    Returns:
        The top ``k`` eigenvalues (descending) and the smallest eigenvalue, float64.
    """
    model64 = copy.deepcopy(model).double()
    batch64 = (batch[0].double(), batch[1])
    with HessianVectorProduct(model64, loss_fn, batch64) as hvp:
        H = hvp.dense(max_params=None, max_memory_bytes=None)
    eigenvalues = torch.linalg.eigvalsh(H)
    return eigenvalues.flip(0)[:k].clone(), eigenvalues[0].clone()


# ----------------------------------------------------------------------------- methods
def ours(model: nn.Module, batch: Batch, k: int, seed: int, backend: str) -> Callable[[], Run]:
    """Our ``hessian_eigenvalues`` with the given backend (default tolerance)."""

    def run() -> Run:
        res = hessian_eigenvalues(model, loss_fn, batch, k=k, which="LA", seed=seed,
                                  backend=backend)  # type: ignore[arg-type]
        unconverged = int((~res.converged).sum())
        note = f"{unconverged} unconverged" if unconverged else ""
        return Run(res.eigenvalues.to(torch.float64), res.num_matvecs, note)

    return run


def _eigsh_start(n: int, seed: int) -> np.ndarray:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64).numpy()


def curvlinops_eigsh(
    model: nn.Module, batch: Batch, k: int, seed: int, tol: float
) -> Callable[[], Run]:
    """``curvlinops.HessianLinearOperator`` (as a SciPy operator) + ``eigsh(which="LA")``.

    The operator is built inside the timed function (it is cheap: no forward pass with
    ``check_deterministic=False``; the default check runs extra products at construction).
    ``to_scipy()`` gives a float64 SciPy operator whose products run in the model's float32.
    """
    with warnings.catch_warnings():  # linear_operator (a curvlinops dependency) uses torch.jit
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
        from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> Run:
        H = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [batch],
                                  check_deterministic=False)
        op = H.to_scipy() if hasattr(H, "to_scipy") else H  # curvlinops < 2 is already SciPy
        count = [0]

        def matvec(v: np.ndarray) -> np.ndarray:
            count[0] += 1
            return op.matvec(v)

        def matmat(V: np.ndarray) -> np.ndarray:
            count[0] += V.shape[1]
            return op.matmat(V)

        counted = LinearOperator(op.shape, matvec=matvec, matmat=matmat, dtype=op.dtype)
        n = op.shape[0]
        with warnings.catch_warnings():  # torch's forward-AD decompositions (first jvp)
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
            vals = eigsh(counted, k=k, which="LA", tol=tol, v0=_eigsh_start(n, seed),
                         return_eigenvectors=False)
        return Run(torch.from_numpy(np.sort(vals)[::-1].copy()), count[0])

    return run


@contextlib.contextmanager
def _count_pyhessian_products(count: list[int]) -> Iterator[None]:
    """Count PyHessian's products by wrapping the function its ``hessian`` module calls."""
    module = sys.modules["pyhessian.hessian"]  # `pyhessian.hessian` is shadowed by the class
    original = module.hessian_vector_product

    def counted(gradsH: list[Tensor], params: list[Tensor], v: list[Tensor]) -> tuple[Tensor]:
        count[0] += 1
        return original(gradsH, params, v)

    module.hessian_vector_product = counted
    try:
        yield
    finally:
        module.hessian_vector_product = original


def pyhessian_power(
    model: nn.Module, batch: Batch, k: int, seed: int, max_iter: int, tol: float
) -> Callable[[], Run]:
    """PyHessian's power iteration with deflation, from a seeded global RNG.

    PyHessian calls ``model.eval()`` and leaves ``.grad`` (with its graph) on the parameters;
    both are undone here so the other methods see the model unchanged.
    """
    from pyhessian import hessian as PyHessian

    def run() -> Run:
        count = [0]
        was_training = model.training
        torch.manual_seed(seed)  # PyHessian draws its start vectors from the global RNG
        try:
            with _count_pyhessian_products(count), warnings.catch_warnings():
                # PyHessian uses backward(create_graph=True); the .grad cycle is broken below.
                warnings.filterwarnings("ignore", message=".*create_graph=True.*")
                h = PyHessian(model, nn.CrossEntropyLoss(), data=batch, cuda=False)
                vals, _ = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
        finally:
            for p in model.parameters():
                p.grad = None
            model.train(was_training)
        values = torch.tensor(sorted(vals, reverse=True), dtype=torch.float64)
        return Run(values, count[0])

    return run


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def build_methods(model: nn.Module, batch: Batch, args: argparse.Namespace) -> list[Method]:
    """Our two backends and whichever references are installed (the others are skipped)."""
    methods = [
        Method("ours (torch Lanczos)", "ours torch", _version("lightning-plasticity"),
               ours(model, batch, args.k, args.seed, "torch")),
        Method("ours (scipy ARPACK)", "ours scipy", _version("lightning-plasticity"),
               ours(model, batch, args.k, args.seed, "scipy")),
    ]
    try:
        for tol in args.eigsh_tols:
            label = "tol=0" if tol == 0 else f"tol={tol:.1e}"
            methods.append(Method(f"curvlinops+eigsh {label}", f"curv {label}",
                                  _version("curvlinops-for-pytorch"),
                                  curvlinops_eigsh(model, batch, args.k, args.seed, tol)))
    except ImportError as err:
        print(f"[skip] curvlinops + eigsh: {err}; install with `{PIP} curvlinops-for-pytorch`")
    try:
        methods.append(Method("PyHessian (power iter.)", "PyHessian", _version("pyhessian"),
                              pyhessian_power(model, batch, args.k, args.seed,
                                              args.pyhessian_max_iter, args.pyhessian_tol)))
    except ImportError as err:
        print(f"[skip] PyHessian: {err}; install with `{PIP} pyhessian`")
    return methods


# ----------------------------------------------------------------------------- main
def _fmt_err(x: float) -> str:
    return f"{x:9.2e}" if math.isfinite(x) else f"{'n/a':>9}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64, help="hidden width (64: 8,970 params)")
    parser.add_argument("--batch", type=int, default=512, help="probe batch size")
    parser.add_argument("--k", type=int, default=20, help="number of top eigenvalues")
    parser.add_argument("--train-steps", type=int, default=200, help="Adam steps before")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (best reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eigsh-tols", type=float, nargs="+",
                        default=[0.0, math.sqrt(torch.finfo(torch.float32).eps)],
                        help="eigsh tol values for curvlinops (default: eigsh's 0, ours)")
    parser.add_argument("--pyhessian-max-iter", type=int, default=100)
    parser.add_argument("--pyhessian-tol", type=float, default=1e-3)
    parser.add_argument("--per-eigenvalue", action="store_true",
                        help="also print every eigenvalue's relative error")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_all = time.perf_counter()

    model, batch = make_problem(args.hidden, args.batch, args.train_steps, args.seed)
    n = sum(p.numel() for p in model.parameters())
    methods = build_methods(model, batch, args)

    # Warm-up (one untimed run each; also gives the eigenvalues and product counts), then
    # interleaved timed runs so that every method sees the same machine load.
    results = {m.name: m.run() for m in methods}
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    for _ in range(args.repeats):
        for m in methods:
            t0 = time.perf_counter()
            results[m.name] = m.run()
            times[m.name].append(time.perf_counter() - t0)
    t_methods = time.perf_counter() - start_all

    t0 = time.perf_counter()
    truth, smallest = dense_top_eigenvalues(model, batch, args.k)
    t_dense = time.perf_counter() - t0

    print(f"MLP 64-{args.hidden}-{args.hidden}-10 tanh, {n} parameters, load_digits, "
          f"{args.train_steps} Adam steps, probe batch {args.batch}, cross-entropy; top-{args.k} "
          f"(which='LA'); float32 runs, {torch.get_num_threads()} thread, best of "
          f"{args.repeats} after a warm-up")
    print(f"dense float64 truth: lambda_1 = {truth[0]:.6g}, lambda_{args.k} = "
          f"{truth[-1]:.6g}, lambda_min = {smallest:.6g} ({t_dense:.1f} s, not timed below)")
    print(f"eigsh tol (curvlinops) = {', '.join(f'{t:.2e}' for t in args.eigsh_tols)}; "
          f"ours: tol = sqrt(eps_float32) = {math.sqrt(torch.finfo(torch.float32).eps):.2e}; "
          f"PyHessian maxIter = "
          f"{args.pyhessian_max_iter}, tol = {args.pyhessian_tol:g}")
    print()
    header = (f"{'method':<28} {'version':>8} {'time (s)':>9} {'vs ours':>8} {'#HVP':>6} "
              f"{'ms/HVP':>7} {'max rel err':>11} {'max err/l1':>10}  note")
    print(header)
    print("-" * len(header))
    t_ours = min(times[methods[0].name])
    for m in methods:
        r, t = results[m.name], min(times[m.name])
        k_found = min(len(r.eigenvalues), args.k)
        err = (r.eigenvalues[:k_found] - truth[:k_found]).abs()
        rel = float((err / truth[:k_found].abs()).max()) if k_found else math.nan
        abs_rel = float(err.max() / truth[0].abs()) if k_found else math.nan
        hvps = f"{r.num_hvps:6d}" if r.num_hvps is not None else f"{'?':>6}"
        per = f"{1e3 * t / r.num_hvps:7.2f}" if r.num_hvps else f"{'?':>7}"
        note = r.note if k_found == args.k else f"only {k_found} values; {r.note}"
        print(f"{m.name:<28} {m.version:>8} {t:9.3f} {t / t_ours:7.2f}x {hvps} {per} "
              f"{_fmt_err(rel):>11} {_fmt_err(abs_rel):>10}  {note}")
    print()
    if args.per_eigenvalue:
        print(f"{'i':>3} {'dense float64':>14} " + " ".join(f"{m.short:>14}" for m in methods))
        for i in range(args.k):
            cells = []
            for m in methods:
                ev = results[m.name].eigenvalues
                cells.append(f"{float((ev[i] - truth[i]) / truth[i].abs()):14.2e}"
                             if i < len(ev) else f"{'-':>14}")
            print(f"{i + 1:3d} {float(truth[i]):14.8f} " + " ".join(cells))
        print("(per method: relative error of the i-th largest value)")
        print()
    print(f"total {time.perf_counter() - start_all:.0f} s (methods incl. warm-up "
          f"{t_methods:.0f} s, dense truth {t_dense:.0f} s)")


if __name__ == "__main__":
    main()
