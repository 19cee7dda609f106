"""Batches per second of the task stream vs a plain TensorDataset DataLoader, in one run.

Both iterate the same tensors with the same batch size; the task stream's time includes applying
the task's change (here a pixel permutation plus normalisation, as in permuted MNIST) the way
training does, in ``on_after_batch_transfer``. The plain loader gets inputs normalised in advance,
so it does strictly less work. Target: ratio >= 0.95.

Usage: python benchmarks/datamodule_throughput.py [--dataset mnist] [--batches 2000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_plasticity.data import ContinualDataModule


def mnist_root() -> str | None:
    source = Path(os.environ.get("LP_DATASETS_DIR",
                                 Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    if not (source / "MNIST" / "raw").is_dir():
        return None
    root = Path(tempfile.mkdtemp())
    shutil.copytree(source / "MNIST" / "raw", root / "MNIST" / "raw")
    return str(root)


def batches_per_second(loader, num_batches: int, transform=None) -> float:  # noqa: ANN001
    done, start = 0, time.perf_counter()
    while done < num_batches:
        for batch in loader:
            if transform is not None:
                batch = transform(batch, 0)
            done += 1
            if done == num_batches:
                break
    return num_batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "digits"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset, root = args.dataset, None
    if dataset == "mnist" and (root := mnist_root()) is None:
        print("MNIST archives not found; using digits")
        dataset = "digits"
    dm = ContinualDataModule(dataset, "permuted_inputs", num_tasks=1,
                             steps_per_task=args.batches, batch_size=args.batch_size,
                             num_workers=args.num_workers, data_dir=root or "data",
                             download=root is not None)
    dm.setup("fit")
    stream = dm.train_dataloader()
    plain = DataLoader(TensorDataset(dm.base.normalize(dm.base.train_x), dm.base.train_y),
                       batch_size=args.batch_size, shuffle=True, drop_last=True,
                       num_workers=args.num_workers)
    # Interleave repeats so both see the same machine load; report the best of each.
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(batches_per_second(stream, args.batches, dm.on_after_batch_transfer))
        theirs.append(batches_per_second(plain, args.batches))
    print(f"dataset={dataset} batch_size={args.batch_size} batches={args.batches} "
          f"num_workers={args.num_workers}")
    print(f"task stream (permuted_inputs): {max(ours):9.1f} batches/s")
    print(f"plain TensorDataset loader:    {max(theirs):9.1f} batches/s")
    print(f"ratio stream / plain:          {max(ours) / max(theirs):9.2f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
