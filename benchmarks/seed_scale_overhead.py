"""Measurement cost at the seed experiments' scale: MNIST MLP 784-100-100-10, 1,000 steps a task.

Trains label-permuted MNIST (89,610 parameters, Adam, batch 64) for ``--tasks`` tasks of
``--steps`` optimizer steps, once plain and once with each measurement callback at its defaults,
in this process with one torch thread, alternating plain and measured runs for ``--repeats``
rounds. For each callback it prints the seconds per task spent inside its measurements (timed
around ``MeasurementCallback.measure_now``, the part that does not drown in run-to-run noise of
a few-second fit) with the ratio they imply against plain training, and the raw ratio of the best
wall times. Targets: ``HessianRankCallback`` (the whole model's eps-rank at every task start)
at most 1.5.

Usage::

    .venv/bin/python benchmarks/seed_scale_overhead.py               # every callback
    .venv/bin/python benchmarks/seed_scale_overhead.py --tasks 2 --callbacks KFACCallback
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plasticity_study import mnist_root  # noqa: E402 - the study's offline MNIST copy

DEFAULT = ["HessianRankCallback", "UnitActivityCallback", "FeatureRankCallback",
           "ParameterStatsCallback", "GradientInterferenceCallback", "KFACCallback",
           "ENTKCallback", "PlasticityProbeCallback"]


MEASURED: dict[str, float] = {}
COUNTS: dict[str, int] = {}  # measurements made in the last fit


def fit(data_dir: str, tasks: int, steps: int, callback: str | None) -> float:
    import lightning.pytorch as pl

    from lightning_plasticity.callbacks import MeasurementCallback

    if not hasattr(MeasurementCallback.measure_now, "timed"):
        untimed = MeasurementCallback.measure_now

        def timed(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            start = time.perf_counter()
            try:
                return untimed(self, *args, **kwargs)
            finally:
                name = type(self).__name__
                MEASURED[name] = MEASURED.get(name, 0.0) + time.perf_counter() - start

        timed.timed = True  # type: ignore[attr-defined]
        MeasurementCallback.measure_now = timed  # type: ignore[method-assign]

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # after Lightning's own setup

    from lightning_plasticity import callbacks as cb
    from lightning_plasticity.data import ContinualDataModule
    from lightning_plasticity.models import MLP, ContinualClassifier

    pl.seed_everything(0, verbose=False)
    dm = ContinualDataModule("mnist", "permuted_labels", num_tasks=tasks, steps_per_task=steps,
                             batch_size=64, data_dir=data_dir, seed=0)
    model = ContinualClassifier(network=partial(MLP, width=100, depth=2), lr=3e-3)
    callbacks = [getattr(cb, callback)()] if callback else []
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
                         callbacks=callbacks)
    dm.setup("fit")  # load MNIST before the clock starts
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    for c in callbacks:
        COUNTS[type(c).__name__] = len(c.history)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--callbacks", nargs="+", default=DEFAULT)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    data_dir = mnist_root()
    fit(data_dir, 1, 50, None)  # warm-up: the first fit of a process pays one-off start-up costs
    plain: list[float] = []
    walls: dict[str, float] = {}
    inside: dict[str, float] = {}
    for _ in range(args.repeats):
        plain.append(fit(data_dir, args.tasks, args.steps, None))
        for name in args.callbacks:
            MEASURED.clear()
            wall = fit(data_dir, args.tasks, args.steps, name)
            walls[name] = min(walls.get(name, wall), wall)
            inside[name] = min(inside.get(name, MEASURED.get(name, 0.0)),
                               MEASURED.get(name, 0.0))
            print(f"{name}: {wall:.1f} s, {MEASURED.get(name, 0.0):.2f} s measuring "
                  f"({COUNTS.get(name, 0)} measurements)", flush=True)
    base = min(plain)
    print(f"\nMNIST MLP 784-100-100-10 (89,610 parameters), {args.tasks} tasks x {args.steps} "
          f"Adam steps; plain {base:.1f} s ({base / args.tasks:.2f} s a task; runs "
          f"{', '.join(f'{p:.1f}' for p in plain)})")
    print("| callback (defaults) | s measuring per task | (plain + measuring) / plain | "
          "best wall / best plain |")
    print("|---|---|---|---|")
    for name, wall in walls.items():
        per_task = inside[name] / args.tasks
        print(f"| {name} | {per_task:.3f} | {(base + inside[name]) / base:.3f} | "
              f"{wall / base:.3f} |")


if __name__ == "__main__":
    main()
