"""Plain ReLU MLP with Adam vs each regularizer and intervention on label-permuted MNIST.

For every method the same stream is trained (``--tasks`` tasks of ``--steps`` Adam steps each,
labels permuted per task, a ``--subset`` of MNIST training images per task) and the mean
task-end accuracy over the first 10 and the last 10 tasks is reported. Loss of plasticity shows
as last-10 < first-10. The table is printed as Markdown (``docs/plasticity_study.md`` holds a
run's output).

Usage::

    .venv/bin/python benchmarks/plasticity_study.py --tasks 50 --seeds 0 1 2 --jobs 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

METHODS = [
    "plain", "l2", "l2_init", "wasserstein_init", "l2er", "layernorm_weight_decay",
    "shrink_and_perturb", "reset_last_layer", "redo", "continual_backprop",
]


def mnist_root() -> str:
    source = Path(os.environ.get("LP_DATASETS_DIR",
                                 Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    root = Path(tempfile.mkdtemp())
    shutil.copytree(source / "MNIST" / "raw", root / "MNIST" / "raw")
    # Unpack once here: workers unpacking the same archives concurrently read half-written
    # files ("invalid literal for int() with base 16").
    from torchvision.datasets import MNIST

    for train in (True, False):
        MNIST(str(root), train=train, download=True)
    return str(root)


def run(job: tuple[str, int, dict[str, Any]]) -> tuple[str, int, list[float], float]:
    """Train one method on one seed's stream; return its task-end accuracies and wall time."""
    method, seed, args = job
    args = {**args, "seed": seed}
    import logging

    import lightning.pytorch as pl
    import torch

    from lightning_plasticity import callbacks as cb
    from lightning_plasticity import regularizers as reg
    from lightning_plasticity.data import ContinualDataModule
    from lightning_plasticity.models import MLP, ContinualClassifier

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    pl.seed_everything(args["seed"], verbose=False)
    net = partial(MLP, width=args["width"], depth=2,
                  norm="layer" if method == "layernorm_weight_decay" else "none")
    module_kwargs: dict[str, Any] = {"network": net, "lr": args["lr"]}
    cls: type = ContinualClassifier
    if method == "l2":
        cls, module_kwargs["l2_coef"] = type("L2Net", (reg.L2Regularizer, ContinualClassifier),
                                             {}), 1e-4
    elif method == "l2_init":
        cls = type("L2InitNet", (reg.L2InitRegularizer, ContinualClassifier), {})
        module_kwargs["l2_init_coef"] = 1e-3
    elif method == "wasserstein_init":
        cls = type("WNet", (reg.WassersteinInitRegularizer, ContinualClassifier), {})
        module_kwargs["wasserstein_coef"] = 1e-1
    elif method == "l2er":
        cls = type("L2ERNet", (reg.L2ERRegularizer, ContinualClassifier), {})
        module_kwargs["l2er_coef"] = 1e-3
    elif method == "layernorm_weight_decay":
        module_kwargs.update(optimizer="adamw", weight_decay=1e-2)
    callbacks = {
        "shrink_and_perturb": [cb.ShrinkAndPerturb()],
        "reset_last_layer": [cb.ResetLayers()],
        "redo": [cb.ReDo(every_n_train_steps=args["steps"] // 2)],
        "continual_backprop": [cb.ContinualBackprop()],
    }.get(method, [])
    dm = ContinualDataModule("mnist", "permuted_labels", num_tasks=args["tasks"],
                             steps_per_task=args["steps"], batch_size=64,
                             subset_size=args["subset"], data_dir=args["data_dir"],
                             download=True, seed=args["seed"])
    start = time.perf_counter()
    pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
               callbacks=callbacks).fit(cls(**module_kwargs), datamodule=dm)
    return method, seed, [h["end_accuracy"] for h in dm.task_history], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--subset", type=int, default=2000)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one run per method and seed; the table averages over seeds")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the per-task accuracies (JSON) and their plot (PNG)")
    args = vars(parser.parse_args())
    args["data_dir"] = mnist_root()
    jobs = [(m, seed, args) for m in args["methods"] for seed in args["seeds"]]
    accs: dict[str, dict[int, list[float]]] = {m: {} for m in args["methods"]}
    walls: dict[str, list[float]] = {m: [] for m in args["methods"]}
    with ProcessPoolExecutor(args["jobs"]) as pool:
        for method, seed, acc, wall in pool.map(run, jobs):
            print(f"done: {method} seed {seed} ({wall:.0f} s)", flush=True)
            accs[method][seed], walls[method] = acc, [*walls[method], wall]
    seeds = args["seeds"]
    print(f"\nlabel-permuted MNIST, {args['tasks']} tasks x {args['steps']} Adam steps "
          f"(lr {args['lr']}, batch 64, {args['subset']} images per task), ReLU MLP "
          f"784-{args['width']}-{args['width']}-10, seeds {seeds}; mean task-end accuracy over "
          "the first and the last 10 tasks, averaged over seeds\n")
    print("| method | first 10 tasks | last 10 tasks | change | last 10 per seed | wall (s) |")
    print("|---|---|---|---|---|---|")
    for method in args["methods"]:
        firsts = [_mean(accs[method][s][:10]) for s in seeds]
        lasts = [_mean(accs[method][s][-10:]) for s in seeds]
        first, last = sum(firsts) / len(seeds), sum(lasts) / len(seeds)
        per_seed = ", ".join(f"{v:.3f}" for v in lasts)
        print(f"| {method} | {first:.3f} | {last:.3f} | {last - first:+.3f} | {per_seed} | "
              f"{sum(walls[method]) / len(walls[method]):.0f} |")
    if args["out"] is not None:
        write_curves(args["out"], accs, {k: v for k, v in args.items() if k != "out"})


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def write_curves(out: Path, accs: dict[str, dict[int, list[float]]],
                 settings: dict[str, Any]) -> None:
    """Save the per-task task-end accuracies (per method and seed) as JSON and plot their
    mean over seeds, one line per method."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in settings.items() if k != "data_dir"}
    (out / "plasticity_study.json").write_text(json.dumps(
        {"settings": settings,
         "end_accuracy": {m: {str(s): a for s, a in runs.items()} for m, runs in accs.items()}},
        indent=1))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, runs in accs.items():
        mean = [sum(v) / len(v) for v in zip(*runs.values())]
        ax.plot(range(1, len(mean) + 1), mean, label=method, lw=1.2)
    ax.set(xlabel="task", ylabel="task-end accuracy",
           title=f"label-permuted MNIST: task-end accuracy, mean of {len(settings['seeds'])} "
                 "seed(s)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "plasticity_study.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
