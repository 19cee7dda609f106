"""Shared fixtures: offline copies of the real datasets and small helpers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]



def shared_datasets_dir() -> Path:
    """``$LP_DATASETS_DIR``, else ``../shared/datasets`` next to the repository."""
    return Path(os.environ.get("LP_DATASETS_DIR", REPO.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def torchvision_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary torchvision root holding copies of the MNIST and FashionMNIST archives.

    torchvision unpacks next to the archives, so the shared folder itself is never used.
    """
    source = shared_datasets_dir()
    if not (source / "MNIST" / "raw").is_dir():
        pytest.skip(f"real datasets not found at {source}; set LP_DATASETS_DIR")
    root = tmp_path_factory.mktemp("torchvision")
    for name in ("MNIST", "FashionMNIST"):
        (root / name / "raw").mkdir(parents=True)
        for archive in (source / name / "raw").glob("*.gz"):
            shutil.copy(archive, root / name / "raw" / archive.name)
    return root


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A finished small quickstart run through the CLI (``tests/quickstart_runs.py``), offline
    wandb included: ``(folder, completed process)``. Tests must not write into the folder."""
    from tests.quickstart_runs import run_quickstart

    folder = tmp_path_factory.mktemp("quickstart")
    done = run_quickstart(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, done
