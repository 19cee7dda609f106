"""Cost of the Wasserstein init penalty per training step, on the seed experiments' MLP.

Two measurements, each within one run (plain and penalised alternate, so both see the same
machine load), one torch thread:

* **loop**: an MLP 784-100-100-10 (ReLU, 89,610 parameters) trained by Adam on random
  MNIST-shaped batches of 64; the time per optimisation step (forward, loss, backward, Adam
  step) plain, with ``1e-2 * wasserstein_init_penalty(params, sorted_anchors,
  anchors_sorted=True)`` added (the library function as it is), and with the naive reference
  (autograd through ``torch.sort(...).values``) for comparison. ``--repeats`` alternating rounds
  of ``--steps`` steps; the best and the median round of each are reported.
* **lightning** (``--lightning-steps`` > 0): ``Trainer.fit`` of
  ``class Net(WassersteinInitRegularizer, ContinualClassifier)`` (``wasserstein_coef=1e-2``)
  vs a plain ``ContinualClassifier`` on label-permuted MNIST (the study's stream, from the
  offline copy of ``plasticity_study.mnist_root``; ``--digits`` uses the bundled 8x8 digits
  instead), MLP width 100 depth 2, batch 64, Adam; the time of ``fit`` per step.

Target (issue 11): the penalised step at most 1.5x the plain one. ``--profile`` prints the
torch profiler's table of one penalised loop step.

Run: ``.venv/bin/python benchmarks/wasserstein_overhead.py [--steps 200] [--repeats 7]
[--lightning-steps 600] [--lightning-repeats 3] [--profile]``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_plasticity.regularizers.penalties import wasserstein_init_penalty

MODES = ["plain", "wasserstein_init_penalty", "reference (torch.sort autograd)"]


def reference_penalty(params: list[torch.Tensor], sorted_anchors: list[torch.Tensor]
                      ) -> torch.Tensor:
    """The definition, differentiated by autograd through ``torch.sort``."""
    total = params[0].new_zeros(())
    for p, a in zip(params, sorted_anchors):
        total = total + (p.flatten().sort().values - a.flatten()).square().mean()
    return total


def fresh_mlp() -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor], torch.optim.Adam]:
    """The seeded MLP 784-100-100-10, its parameters, sorted anchors and Adam."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                          nn.Linear(100, 10))
    params = list(model.parameters())
    anchors = [p.detach().flatten().sort().values.view(p.shape) for p in params]
    return model, params, anchors, torch.optim.Adam(params, lr=1e-3)


def make_loop(mode: str, steps: int, coef: float = 1e-2):
    """A closure that trains a fresh MLP for ``steps`` steps and returns seconds per step."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))

    def run() -> float:
        model, params, anchors, opt = fresh_mlp()
        start = time.perf_counter()
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            if mode == MODES[1]:
                loss = loss + coef * wasserstein_init_penalty(params, anchors,
                                                              anchors_sorted=True)
            elif mode == MODES[2]:
                loss = loss + coef * reference_penalty(params, anchors)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / steps

    return run


def profile_step() -> None:
    from torch.profiler import ProfilerActivity, profile

    model, params, anchors, opt = fresh_mlp()
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y) + 1e-2 * wasserstein_init_penalty(
            params, anchors, anchors_sorted=True)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def lightning_fit(steps: int, wasserstein: bool, data_dir: str | None) -> float:
    """Seconds per step of ``Trainer.fit`` (data loaded before the clock starts)."""
    import lightning.pytorch as pl

    from lightning_plasticity.data import ContinualDataModule
    from lightning_plasticity.models import MLP, ContinualClassifier
    from lightning_plasticity.regularizers import WassersteinInitRegularizer

    class Net(WassersteinInitRegularizer, ContinualClassifier):
        pass

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    pl.seed_everything(0, verbose=False)
    if data_dir is None:
        dm = ContinualDataModule("digits", "permuted_labels", num_tasks=1, steps_per_task=steps,
                                 batch_size=64, seed=0)
    else:
        dm = ContinualDataModule("mnist", "permuted_labels", num_tasks=1, steps_per_task=steps,
                                 batch_size=64, data_dir=data_dir, seed=0)
    network = partial(MLP, width=100, depth=2)
    model = (Net(network=network, lr=3e-3, wasserstein_coef=1e-2) if wasserstein
             else ContinualClassifier(network=network, lr=3e-3))
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    dm.setup("fit")
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    assert trainer.global_step == steps, trainer.global_step
    return seconds / steps


def report(title: str, times: dict[str, list[float]]) -> None:
    print(title)
    best_plain = min(times["plain"])
    median_plain = statistics.median(times["plain"])
    for mode, ts in times.items():
        best, median = min(ts), statistics.median(ts)
        print(f"  {mode:34s} best {1e3 * best:7.3f} ms/step ({best / best_plain:5.2f}x plain)"
              f"   median {1e3 * median:7.3f} ms/step ({median / median_plain:5.2f}x plain)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="loop steps per round")
    parser.add_argument("--repeats", type=int, default=7, help="alternating loop rounds")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the naive torch.sort reference in the loop")
    parser.add_argument("--lightning-steps", type=int, default=600,
                        help="steps per Trainer.fit (0: skip the Lightning measurement)")
    parser.add_argument("--lightning-repeats", type=int, default=3)
    parser.add_argument("--digits", action="store_true",
                        help="Lightning on the bundled 8x8 digits instead of MNIST")
    parser.add_argument("--profile", action="store_true",
                        help="print the profiler table of a penalised loop step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    modes = MODES[:2] if args.no_reference else MODES
    runs = {m: make_loop(m, args.steps) for m in modes}
    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            times[m].append(runs[m]())
    report(f"loop: MLP 784-100-100-10 (89,610 parameters), batch 64, Adam, 1 torch thread, "
           f"{args.repeats} alternating rounds x {args.steps} steps", times)

    if args.lightning_steps > 0:
        data_dir = None
        if not args.digits:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from plasticity_study import mnist_root

            data_dir = mnist_root()
        lightning_fit(50, False, data_dir)  # warm-up: one-off start-up costs of the first fit
        lightning_fit(50, True, data_dir)
        fits: dict[str, list[float]] = {"plain": [], "WassersteinInitRegularizer": []}
        for _ in range(args.lightning_repeats):
            fits["plain"].append(lightning_fit(args.lightning_steps, False, data_dir))
            fits["WassersteinInitRegularizer"].append(
                lightning_fit(args.lightning_steps, True, data_dir))
        report(f"lightning: Trainer.fit, {'digits' if args.digits else 'MNIST'} permuted "
               f"labels, MLP width 100 depth 2, batch 64, Adam, wasserstein_coef=1e-2, "
               f"{args.lightning_repeats} alternating fits x {args.lightning_steps} steps", fits)

    if args.profile:
        profile_step()


if __name__ == "__main__":
    main()
