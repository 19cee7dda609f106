"""Measurement cost at the seed experiments' scale: MNIST MLP 784-100-100-10, 1,000 steps a task.

Trains label-permuted MNIST (89,610 parameters, Adam, batch 64) for ``--tasks`` tasks of
``--steps`` optimizer steps, once plain and once with each measurement callback at its defaults,
in this process with one torch thread, and prints for each callback the wall-time ratio against
the best plain run and the extra seconds per task. ``HessianRankCallback`` is left out by default
(at defaults it costs minutes per task start on this model, the subject of issue 11); add it with
``--callbacks HessianRankCallback``.

Usage::

    .venv/bin/python benchmarks/seed_scale_overhead.py               # the issue-4/9 callbacks
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

DEFAULT = ["UnitActivityCallback", "FeatureRankCallback", "ParameterStatsCallback",
           "GradientInterferenceCallback", "KFACCallback", "ENTKCallback",
           "PlasticityProbeCallback"]


def fit(data_dir: str, tasks: int, steps: int, callback: str | None) -> float:
    import lightning.pytorch as pl

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
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--callbacks", nargs="+", default=DEFAULT)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    data_dir = mnist_root()
    plain = [fit(data_dir, args.tasks, args.steps, None)]
    walls = {}
    for name in args.callbacks:
        walls[name] = fit(data_dir, args.tasks, args.steps, name)
        print(f"{name}: {walls[name]:.1f} s", flush=True)
    plain.append(fit(data_dir, args.tasks, args.steps, None))
    base = min(plain)
    print(f"\nMNIST MLP 784-100-100-10 (89,610 parameters), {args.tasks} tasks x {args.steps} "
          f"Adam steps; plain {base:.1f} s ({base / args.tasks:.2f} s a task; runs "
          f"{', '.join(f'{p:.1f}' for p in plain)})")
    print("| callback (defaults) | with / plain | extra s per task |")
    print("|---|---|---|")
    for name, wall in walls.items():
        print(f"| {name} | {wall / base:.3f} | {(wall - base) / args.tasks:.3f} |")


if __name__ == "__main__":
    main()
