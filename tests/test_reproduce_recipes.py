"""The reproduction recipes run at smoke scale through the real CLI, one process per cell.

For every shipped study (``recipes/**/study.yaml``) each recipe entry and each method
runs at least once (recipe ``i`` with method ``i``, cycling the shorter list), a few tasks of a
few steps on the real datasets, and leaves its metrics and histories; the full-scale variants
must resolve (``--print_config``): their data (CIFAR-10, ImageNet 32x32) is not offline here.
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lightning_plasticity.study import expand_study, load_study_spec, run_cell
from lightning_plasticity.study.grid import Cell
from lightning_plasticity.study.runner import cli_executable
from tests.conftest import REPO

STUDIES = sorted((REPO / "recipes").glob("**/study.yaml"))
FULL_SCALE = sorted((REPO / "recipes" / "reproduce").glob("*/*_full.yaml"))
SMOKE = {"data.init_args.num_tasks": 2, "data.init_args.steps_per_task": 3,
         "data.init_args.subset_size": 64, "data.init_args.val_size": 32,
         "data.init_args.batch_size": 16}


def smoke_cells(study: Path) -> list[Cell]:
    """Cells covering every recipe entry and every method (first variant, first seed)."""
    spec = load_study_spec(study)
    cells = expand_study(spec, SMOKE)
    first = {}
    for cell in cells:
        first.setdefault((cell.recipe, cell.method), cell)
    chosen = []
    for method in spec.methods:  # each method on the first recipe that runs it
        chosen += [next(c for (r, m), c in first.items() if m == method)]
    for recipe in spec.recipes:  # each recipe not covered yet with its first method
        if not any(c.recipe == recipe for c in chosen):
            chosen += [next(c for (r, m), c in first.items() if r == recipe)]
    return list({c.id: c for c in chosen}.values())


@pytest.fixture(scope="module")
def data_dir(torchvision_root: Path) -> Path:
    from torchvision.datasets import MNIST, FashionMNIST

    for dataset in (MNIST, FashionMNIST):  # unpack once, before cells run side by side
        for train in (True, False):
            dataset(str(torchvision_root), train=train, download=True)
    return torchvision_root


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.parent.name)
def test_each_recipe_and_method_runs_at_smoke_scale(study: Path, data_dir: Path,
                                                    tmp_path: Path) -> None:
    cells = smoke_cells(study)
    env = {"OMP_NUM_THREADS": "1", "LP_DATA_DIR": str(data_dir)}
    extra = ["--data.init_args.data_dir", str(data_dir)]

    def run(cell: Cell) -> tuple[Cell, dict]:
        spec = cell.to_json()
        spec["command"] = spec["command"] + extra
        return cell, run_cell(spec, str(tmp_path / cell.id), cli_executable(), env, 600)

    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        results = list(pool.map(run, cells))
    for cell, status in results:
        log = (tmp_path / cell.id / "output.log").read_text()
        assert status["state"] == "done", f"{cell.id}:\n{log[-3000:]}"
        runs = list((tmp_path / cell.id / "runs").glob("*/version_0"))
        assert len(runs) == 1, cell.id
        histories = json.loads((runs[0] / "histories.json").read_text())
        assert len(histories["tasks"]) == 2, cell.id
        if "reproduce" in study.parts:  # every paper's recipe measures something
            assert histories["measurements"], cell.id
        assert (runs[0] / "metrics.csv").is_file()


def test_the_smoke_selection_covers_every_recipe_and_method() -> None:
    for study in STUDIES:
        spec = load_study_spec(study)
        cells = smoke_cells(study)
        assert {c.recipe for c in cells} == set(spec.recipes), study
        allowed = {c.method for c in expand_study(spec)}
        assert {c.method for c in cells} == allowed, study


@pytest.mark.parametrize("recipe", FULL_SCALE, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_full_scale_recipes_resolve(recipe: Path, tmp_path: Path) -> None:
    done = subprocess.run([*cli_executable(), "fit", "--config", str(recipe), "--print_config"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lightning_plasticity.data.ContinualDataModule" in done.stdout


def test_there_is_a_full_scale_variant_per_paper() -> None:
    papers = {p.parent.name for p in (REPO / "recipes" / "reproduce").glob("*/study.yaml")}
    assert {p.parent.name for p in FULL_SCALE} == papers == {
        "lewandowski2024", "tau_trainability", "lyle2023", "lyle2024"}
