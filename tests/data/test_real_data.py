"""Real data through torchvision's loaders: MNIST and FashionMNIST, and an image folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_plasticity.data import ContinualDataModule
from lightning_plasticity.models import CNN, ContinualClassifier
from tests.data.helpers import RecordingDataModule, fast_trainer


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_torchvision_dataset_stream(name: str, torchvision_root: Path) -> None:
    dm = RecordingDataModule(name, "permuted_inputs", num_tasks=2, steps_per_task=3,
                             batch_size=32, data_dir=str(torchvision_root), download=True)
    dm.setup("fit")
    assert dm.base.train_x.shape == (60000, 1, 28, 28) and dm.base.train_x.dtype == torch.uint8
    assert dm.base.val_x.shape == (10000, 1, 28, 28)
    assert dm.num_outputs == 10
    x, y = dm.probe_batch(16)
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 1.0
    fast_trainer(limit_val_batches=1).fit(ContinualClassifier(), datamodule=dm)
    assert [r[1] for r in dm.records] == [0, 0, 0, 1, 1, 1]


def test_image_folder_with_train_and_val(tmp_path: Path) -> None:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
            folder = tmp_path / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(6):
                noise = torch.randint(0, 40, (3,), generator=gen).tolist()
                Image.new("RGB", (12, 12), tuple(v + n for v, n in zip(colour, noise))).save(
                    folder / f"{i}.png")
    dm = RecordingDataModule("image_folder", "class_pairs", num_tasks=3, steps_per_task=2,
                             batch_size=4, data_dir=str(tmp_path), image_size=8)
    dm.setup("fit")
    assert dm.base.train_x.shape == (18, 3, 8, 8) and dm.base.val_x.shape == (18, 3, 8, 8)
    model = ContinualClassifier(network=lambda shape, n: CNN(shape, n, channels=(4,), hidden=8))
    fast_trainer(limit_val_batches=1).fit(model, datamodule=dm)
    assert [h["task"] for h in dm.task_history] == [0, 1, 2]


def test_mnist_download_flag_is_needed_to_unpack(torchvision_root: Path, tmp_path: Path) -> None:
    # Archives present but not unpacked: torchvision needs download=True to unpack them.
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(torchvision_root / "MNIST" / "raw", root / "MNIST" / "raw",
                    ignore=shutil.ignore_patterns("*-ubyte"))
    dm = ContinualDataModule("mnist", data_dir=str(root), download=False)
    with pytest.raises(FileNotFoundError, match="download=True"):
        dm.setup("fit")
