"""Base datasets, loaded once into memory as tensors.

A continual stream indexes these tensors by example; every task-specific change is applied later,
on the batch, in the main process (see :mod:`lightning_plasticity.data.tasks`). Images are kept as
``uint8`` and turned into normalised floats on the device, which keeps DataLoader traffic small.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lightning_plasticity.data.seeding import generator
from lightning_plasticity.data.teachers import LTUTeacher


@dataclass
class BaseData:
    """A dataset split into train and held-out examples.

    Attributes:
        name: the dataset's name.
        train_x: training inputs, ``(N, *input_shape)``, ``uint8`` (images) or ``float32``.
        train_y: class indices ``(N,)`` (``int64``) or regression targets ``(N, k)``.
        val_x: held-out inputs.
        val_y: held-out targets.
        num_classes: number of classes, ``None`` for regression data.
        mean: per-channel mean of the float inputs (after scaling ``uint8`` to ``[0, 1]``).
        std: per-channel standard deviation, same convention.
        teacher: the target function of a synthetic regression set, if any.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    num_classes: int | None
    mean: Tensor = field(default_factory=lambda: torch.zeros(1))
    std: Tensor = field(default_factory=lambda: torch.ones(1))
    teacher: Callable[[Tensor], Tensor] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def is_regression(self) -> bool:
        return self.num_classes is None

    def normalize(self, x: Tensor) -> Tensor:
        """Raw stored inputs to normalised ``float32`` (works on any device)."""
        # One fused affine map: (x / 255 - mean) / std == x * scale + shift.
        raw_scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = (raw_scale / self.std).to(x.device).view(shape)
        shift = (-self.mean / self.std).to(x.device).view(shape)
        return torch.addcmul(shift, x.float(), scale)


@dataclass(frozen=True)
class DatasetOptions:
    """Options shared by the base-dataset loaders (see :class:`ContinualDataModule`)."""

    data_dir: str = "data"
    download: bool = False
    val_fraction: float = 0.2
    image_size: int = 32
    num_classes: int = 10
    input_dim: int = 20
    num_examples: int = 5000
    seed: int = 0


def _channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of stored inputs, in chunks so uint8 sets don't blow up memory."""
    flat = x.flatten(2) if x.dim() >= 3 else x.unsqueeze(-1).transpose(1, 2)
    total = torch.zeros(flat.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    count = 0
    for chunk in flat.split(4096):
        chunk = chunk.double() / 255.0 if chunk.dtype == torch.uint8 else chunk.double()
        total += chunk.sum(dim=(0, 2))
        total_sq += chunk.pow(2).sum(dim=(0, 2))
        count += chunk.shape[0] * chunk.shape[2]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    if x.dim() < 3:  # flat vectors: one "channel" per feature is wrong; use a global scale
        mean = flat.double().mean().reshape(1)
        std = flat.double().std().clamp_min(1e-6).reshape(1)
    return mean.float(), std.float()


def _holdout(
    x: Tensor, y: Tensor, fraction: float, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}.")
    order = torch.randperm(x.shape[0], generator=generator(seed, "holdout"))
    n_val = max(1, int(round(fraction * x.shape[0])))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def _finish(name: str, parts: tuple[Tensor, Tensor, Tensor, Tensor], num_classes: int | None,
            teacher: Callable[[Tensor], Tensor] | None = None) -> BaseData:
    train_x, train_y, val_x, val_y = parts
    mean, std = _channel_stats(train_x)
    return BaseData(name, train_x, train_y, val_x, val_y, num_classes, mean, std, teacher)


def load_digits_data(opts: DatasetOptions) -> BaseData:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes; no download)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    return _finish("digits", _holdout(x, y, opts.val_fraction, opts.seed), 10)


_TORCHVISION = {
    "mnist": ("MNIST", 10),
    "fashion_mnist": ("FashionMNIST", 10),
    "cifar10": ("CIFAR10", 10),
    "cifar100": ("CIFAR100", 100),
}


def _torchvision_split(name: str, opts: DatasetOptions, train: bool) -> tuple[Tensor, Tensor]:
    import torchvision

    cls_name, _ = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    try:
        ds = cls(root=opts.data_dir, train=train, download=opts.download)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"Dataset {name!r} was not found under data_dir={opts.data_dir!r} "
            f"(torchvision: {err}). "
            f"Set download=True to fetch it, or point data_dir at a folder that holds "
            f"{cls_name}/ in torchvision's layout."
        ) from err
    data = torch.as_tensor(ds.data)
    x = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)  # HWC -> CHW
    y = torch.as_tensor(ds.targets, dtype=torch.int64)
    return x.contiguous(), y


def load_torchvision_data(name: str, opts: DatasetOptions) -> BaseData:
    """MNIST, FashionMNIST, CIFAR-10/100 via torchvision; the official test split is held out."""
    train_x, train_y = _torchvision_split(name, opts, train=True)
    val_x, val_y = _torchvision_split(name, opts, train=False)
    return _finish(name, (train_x, train_y, val_x, val_y), _TORCHVISION[name][1])


def _read_image_folder(root: Path, image_size: int) -> tuple[Tensor, Tensor, list[str]]:
    import torchvision
    from torchvision.transforms import functional as TF

    try:
        folder = torchvision.datasets.ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as err:
        raise FileNotFoundError(
            f"image_folder: {root} is not a folder of class subfolders with images ({err}). "
            "Lay it out as data_dir/<class_name>/<image>.png (optionally under train/ and val/)."
        ) from err
    images, labels = [], []
    for path, label in folder.samples:
        try:
            img = folder.loader(path)
        except Exception as err:  # PIL raises several types for unreadable files
            raise ValueError(
                f"image_folder: could not read image {path} ({type(err).__name__}: {err}). "
                "Remove or replace the corrupt file."
            ) from err
        img = TF.resize(TF.pil_to_tensor(img.convert("RGB")), [image_size, image_size],
                        antialias=True)
        images.append(img)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), folder.classes


def load_image_folder_data(opts: DatasetOptions) -> BaseData:
    """A user's folder of class subfolders (e.g. downsampled ImageNet) via ImageFolder.

    ``data_dir/train`` and ``data_dir/val`` are used as the splits when both exist; otherwise
    ``val_fraction`` of ``data_dir`` is held out. Images are resized to ``image_size`` squares.
    """
    root = Path(opts.data_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"image_folder: data_dir={str(root)!r} does not exist. Point data_dir at a folder of "
            "class subfolders."
        )
    if (root / "train").is_dir() and (root / "val").is_dir():
        tx, ty, classes = _read_image_folder(root / "train", opts.image_size)
        vx, vy, val_classes = _read_image_folder(root / "val", opts.image_size)
        if val_classes != classes:
            raise ValueError(
                f"image_folder: train/ and val/ have different classes ({len(classes)} vs "
                f"{len(val_classes)}); give both the same class subfolders."
            )
        return _finish("image_folder", (tx, ty, vx, vy), len(classes))
    x, y, classes = _read_image_folder(root, opts.image_size)
    return _finish("image_folder", _holdout(x, y, opts.val_fraction, opts.seed), len(classes))


def load_gaussian_mixture_data(opts: DatasetOptions) -> BaseData:
    """Synthetic classification: ``num_classes`` isotropic unit Gaussians in ``input_dim`` dims.

    Class means are drawn from ``N(0, 4 I)`` and examples are ``mean_y + N(0, I)``, so classes
    overlap a little; everything derives from ``seed``.
    """
    gen = generator(opts.seed, "gaussian_mixture")
    means = torch.randn(opts.num_classes, opts.input_dim, generator=gen) * 2.0
    y = torch.randint(0, opts.num_classes, (opts.num_examples,), generator=gen)
    x = means[y] + torch.randn(opts.num_examples, opts.input_dim, generator=gen)
    return _finish("gaussian_mixture", _holdout(x, y, opts.val_fraction, opts.seed),
                   opts.num_classes)


def load_regression_teacher_data(opts: DatasetOptions) -> BaseData:
    """Synthetic regression: random input bits and the outputs of an :class:`LTUTeacher`.

    This is the input distribution of Dohare et al.'s slowly-changing regression; with the
    ``identity`` task kind it is a stationary regression problem.
    """
    gen = generator(opts.seed, "regression_teacher")
    teacher = LTUTeacher(opts.input_dim, generator=gen)
    x = torch.randint(0, 2, (opts.num_examples, opts.input_dim), generator=gen).float()
    y = teacher(x)
    parts = _holdout(x, y, opts.val_fraction, opts.seed)
    # Bits are fed as they are: the teacher's thresholds are defined on raw {0, 1} inputs.
    return BaseData("regression_teacher", *parts, None, torch.zeros(1), torch.ones(1), teacher)


DATASETS: dict[str, Callable[[DatasetOptions], BaseData]] = {
    "digits": load_digits_data,
    "mnist": lambda o: load_torchvision_data("mnist", o),
    "fashion_mnist": lambda o: load_torchvision_data("fashion_mnist", o),
    "cifar10": lambda o: load_torchvision_data("cifar10", o),
    "cifar100": lambda o: load_torchvision_data("cifar100", o),
    "image_folder": load_image_folder_data,
    "gaussian_mixture": load_gaussian_mixture_data,
    "regression_teacher": load_regression_teacher_data,
}


def load_base_data(name: str, opts: DatasetOptions) -> BaseData:
    """Load a base dataset by name; raises ``ValueError`` listing the valid names."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}. Choose one of: {', '.join(DATASETS)}.")
    return DATASETS[name](opts)
