"""collect: a tiny real study (4 short fits and a failed cell) read back into per-task tables."""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger
from scipy.stats import spearmanr

from lightning_plasticity.callbacks import HessianRankCallback, HistoryWriter
from lightning_plasticity.data import ContinualDataModule
from lightning_plasticity.models import MLP, ContinualClassifier
from lightning_plasticity.study.collect import (
    best_variants,
    eps_rank_correlation,
    load_run,
    load_study,
    score_key,
    seed_stats,
    summarize,
    task_series,
    window_mean,
    window_stats,
)

EPS = "curvature/hessian_eps_rank"
NUM_TASKS = 3
#: (method, variant, seed, weight decay) of the cells that run
CELLS = [("none", "default", 0, 0.0), ("none", "default", 1, 0.0),
         ("l2", "l2_coef=0.01", 0, 0.01), ("l2", "l2_coef=0.1", 0, 0.1)]
FAILED_ID = "tiny-l2-l2_coef=10-s0"


@dataclass
class TinyStudy:
    root: Path
    #: cell id -> the HessianRankCallback's history and the data module's task history
    hessian: dict[str, list[dict[str, Any]]]
    tasks: dict[str, list[dict[str, float]]]


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def build_tiny_study(root: Path) -> TinyStudy:
    """A finished study as the runner leaves it: 4 short fits on digits, 1 failed cell."""
    cells, hessian, tasks = [], {}, {}
    for method, variant, seed, weight_decay in CELLS:
        cell_id = f"tiny-{method}-{variant}-s{seed}"
        folder = root / "cells" / cell_id
        pl.seed_everything(seed, verbose=False)
        dm = ContinualDataModule("digits", "permuted_labels", num_tasks=NUM_TASKS,
                                 steps_per_task=5, batch_size=16, val_size=32, seed=seed)
        cb = HessianRankCallback(max_overhead=None, num_matvecs=300, probe_size=32, top_k=8)
        trainer = pl.Trainer(
            accelerator="cpu", logger=CSVLogger(folder / "runs", name="tiny"),
            callbacks=[cb, HistoryWriter()], log_every_n_steps=1, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            limit_val_batches=0, default_root_dir=folder)
        model = ContinualClassifier(network=partial(MLP, width=8, depth=1), lr=0.01,
                                    weight_decay=weight_decay)
        trainer.fit(model, datamodule=dm)
        hessian[cell_id], tasks[cell_id] = [dict(h) for h in cb.history], list(dm.task_history)
        cell = {"id": cell_id, "recipe": "tiny", "recipe_path": "recipes/tiny.yaml",
                "method": method, "variant": variant, "params": {}, "seed": seed,
                "command": ["lightning-plasticity", "fit"]}
        cells.append(cell)
        _write_json(folder / "cell.json", cell)
        _write_json(folder / "status.json", {"state": "done", "returncode": 0, "seconds": 1.0})
        (folder / "output.log").write_text("ok\n")
    failed = {"id": FAILED_ID, "recipe": "tiny", "recipe_path": "recipes/tiny.yaml",
              "method": "l2", "variant": "l2_coef=10", "params": {"model.l2_coef": 10},
              "seed": 0, "command": ["lightning-plasticity", "fit"]}
    cells.append(failed)
    _write_json(root / "cells" / FAILED_ID / "cell.json", failed)
    _write_json(root / "cells" / FAILED_ID / "status.json",
                {"state": "failed", "returncode": 1, "seconds": 0.5})
    (root / "cells" / FAILED_ID / "output.log").write_text("Traceback: boom\n")
    _write_json(root / "study.json", {"name": "tiny-study", "cells": cells})
    return TinyStudy(root, hessian, tasks)


_CACHE: dict[str, TinyStudy] = {}


def shared_tiny_study(tmp_path_factory: pytest.TempPathFactory) -> TinyStudy:
    """The tiny study, built once per session for this module and test_report.py."""
    if "study" not in _CACHE:
        _CACHE["study"] = build_tiny_study(tmp_path_factory.mktemp("study"))
    return _CACHE["study"]


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> TinyStudy:
    return shared_tiny_study(tmp_path_factory)


def copy_study(tiny: TinyStudy, dest: Path) -> Path:
    """A private copy, for tests that change files."""
    return Path(shutil.copytree(tiny.root, dest / "study"))


# ---------------------------------------------------------------------------- reading
def test_cells_states_and_problems(tiny_study: TinyStudy) -> None:
    study = load_study(tiny_study.root)
    assert study.name == "tiny-study" and study.is_study
    assert [c.id for c in study.done()] == list(tiny_study.hessian)
    assert [(c.id, c.state, c.returncode) for c in study.problems()] == [(FAILED_ID, "failed", 1)]
    failed = study.problems()[0]
    assert failed.run is None and failed.params == {"model.l2_coef": 10}
    assert study.recipes() == ["tiny"]
    assert list(study.groups("tiny")) == [("none", "default"), ("l2", "l2_coef=0.01"),
                                          ("l2", "l2_coef=0.1"), ("l2", "l2_coef=10")]


def test_table_values_equal_the_callbacks(tiny_study: TinyStudy) -> None:
    study = load_study(tiny_study.root)
    for cell in study.done():
        history, task_history = tiny_study.hessian[cell.id], tiny_study.tasks[cell.id]
        rows = cell.run.table()
        assert [r["task"] for r in rows] == list(range(NUM_TASKS))
        assert [r["end_accuracy"] for r in rows] == [t["end_accuracy"] for t in task_history]
        assert [r["end_loss"] for r in rows] == [t["end_loss"] for t in task_history]
        assert [r["online_accuracy"] for r in rows] == \
            [t["online_accuracy"] for t in task_history]
        starts = [h for h in history if h["event"] == "task_start"]
        assert [r["eps_rank"] for r in rows] == [h[EPS] for h in starts]
        assert [r["normalized_eps_rank"] for r in rows] == \
            [h[EPS] / h["curvature/hessian_num_params"] for h in starts]
        assert rows[1][f"{EPS}@task_start"] == starts[1][EPS]
        assert rows[0]["curvature/grad_norm@task_start"] == starts[0]["curvature/grad_norm"]
        spectra = cell.run.spectra["task_start"]
        assert spectra[2]["curvature/hessian_top_eigenvalues"] == \
            pytest.approx(starts[2]["curvature/hessian_top_eigenvalues"])
        assert cell.run.seed == cell.seed


def test_cell_without_histories_keeps_its_accuracies(tiny_study: TinyStudy,
                                                     tmp_path: Path) -> None:
    root = copy_study(tiny_study, tmp_path)
    cell_id = next(iter(tiny_study.hessian))
    for path in (root / "cells" / cell_id).rglob("histories.json"):
        path.unlink()
    cell = next(c for c in load_study(root).cells if c.id == cell_id)
    assert cell.ok and not cell.run.has_histories
    # From metrics.csv alone: the task-end row of each task (float32 values via the logger)
    assert list(task_series(cell.run, "end_accuracy").values()) == pytest.approx(
        [t["end_accuracy"] for t in tiny_study.tasks[cell_id]], rel=1e-6)
    assert list(task_series(cell.run, "online_accuracy")) == list(range(NUM_TASKS))
    assert task_series(cell.run, "eps_rank") == {}
    assert math.isnan(cell.run.table()[0]["eps_rank"])


def test_broken_cells_never_stop_the_collection(tiny_study: TinyStudy, tmp_path: Path) -> None:
    root = copy_study(tiny_study, tmp_path)
    done_id, other_id = list(tiny_study.hessian)[:2]
    shutil.rmtree(root / "cells" / done_id / "runs")  # "done" but no metrics
    for path in (root / "cells" / other_id).rglob("histories.json"):
        path.write_text("{not json")
    spec = json.loads((root / "study.json").read_text())
    spec["cells"].append({"id": "never-ran", "recipe": "tiny", "method": "none",
                          "variant": "default", "seed": 7})
    (root / "study.json").write_text(json.dumps(spec))
    with pytest.warns(UserWarning, match="not a HistoryWriter file"):
        study = load_study(root)
    states = {c.id: c.state for c in study.problems()}
    assert states == {done_id: "missing", FAILED_ID: "failed", "never-ran": "missing"}
    other = next(c for c in study.cells if c.id == other_id)
    assert other.ok and task_series(other.run, "end_accuracy")


def test_plain_run_folder_is_one_cell(tiny_study: TinyStudy) -> None:
    cell_id = list(tiny_study.hessian)[1]  # seed 1
    for path in (tiny_study.root / "cells" / cell_id / "runs",
                 tiny_study.root / "cells" / cell_id / "runs" / "tiny",
                 tiny_study.root / "cells" / cell_id / "runs" / "tiny" / "version_0"):
        study = load_study(path)
        assert not study.is_study
        [cell] = study.cells
        assert (cell.recipe, cell.method, cell.variant, cell.seed) == ("tiny", "run",
                                                                      "default", 1)
        assert list(task_series(cell.run, "eps_rank").values()) == \
            [h[EPS] for h in tiny_study.hessian[cell_id] if h["event"] == "task_start"]


# ---------------------------------------------------------------------------- merging
def _version(folder: Path, tasks: dict[int, tuple[float, float]],
             eps: dict[int, float]) -> None:
    """A version folder in the layout CSVLogger and HistoryWriter write (see the module
    docstring of collect): step rows, a measurement row, a task-end row per task."""
    folder.mkdir(parents=True)
    columns = [EPS, "epoch", "step", "task/end_accuracy", "task/end_loss", "task/id",
               "task/train_loss"]
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for task, (acc, loss) in tasks.items():
            writer.writerow({EPS: eps.get(task, ""), "step": task * 5})
            writer.writerow({"epoch": task, "step": task * 5, "task/id": task,
                             "task/train_loss": 9.0})
            writer.writerow({"epoch": task, "step": task * 5 + 4, "task/end_accuracy": acc,
                             "task/end_loss": loss})
    records = [{"task": t, "step": t * 5, "event": "task_start", EPS: v,
                "curvature/hessian_num_params": 100.0,
                "curvature/hessian_top_eigenvalues": [v, 1.0]} for t, v in eps.items()]
    _write_json(folder / "histories.json", {"tasks": [], "measurements": {
        "HessianRankCallback": records}})
    (folder / "hparams.yaml").write_text("network: !!python/object:functools.partial {}\n"
                                         "seed: 3\nepochs_per_task: null\n")


def test_resumed_versions_merge_later_wins(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "tiny"
    _version(run_dir / "version_0", {0: (0.5, 1.0), 1: (0.6, 0.9), 2: (0.1, 5.0)},
             {0: 10.0, 1: 11.0, 2: 12.0})
    _version(run_dir / "version_1", {2: (0.7, 0.8), 3: (0.8, 0.7)}, {2: 20.0, 3: 21.0})
    # version_10 sorts after version_2 by number, not by text
    _version(run_dir / "version_10", {3: (0.9, 0.6)}, {})
    _version(run_dir / "version_2", {3: (0.0, 9.9)}, {3: 0.0})
    run = load_run(run_dir)
    assert [v.name for v in run.versions] == ["version_0", "version_1", "version_2",
                                              "version_10"]
    assert task_series(run, "end_accuracy") == {0: 0.5, 1: 0.6, 2: 0.7, 3: 0.9}
    assert task_series(run, "end_loss") == {0: 1.0, 1: 0.9, 2: 0.8, 3: 0.6}
    assert task_series(run, "eps_rank") == {0: 10.0, 1: 11.0, 2: 20.0, 3: 0.0}
    assert task_series(run, "normalized_eps_rank") == {0: 0.1, 1: 0.11, 2: 0.2, 3: 0.0}
    assert run.spectra["task_start"][2]["curvature/hessian_top_eigenvalues"] == [20.0, 1.0]
    assert run.seed == 3


# ---------------------------------------------------------------------------- aggregation
def test_seed_stats_and_windows(tiny_study: TinyStudy) -> None:
    study = load_study(tiny_study.root)
    cells = study.groups("tiny")[("none", "default")]
    acc = np.array([[t["end_accuracy"] for t in tiny_study.tasks[c.id]] for c in cells])
    stats = seed_stats(cells, "end_accuracy")
    assert stats.tasks.tolist() == list(range(NUM_TASKS))
    np.testing.assert_allclose(stats.mean, acc.mean(0))
    np.testing.assert_allclose(stats.std, acc.std(0))
    np.testing.assert_allclose(stats.max, acc.max(0))
    assert stats.count.tolist() == [2] * NUM_TASKS
    firsts = acc[:, :2].mean(1)
    assert window_stats(cells, "end_accuracy", "first", n=2) == pytest.approx(
        (firsts.mean(), firsts.std(), 2))
    assert window_mean({0: 1.0, 1: 2.0, 5: 6.0}, "last", n=2) == 4.0
    # Measured every 4th task of 40: the window is over tasks, not over measurements.
    every_4th = {t: float(t) for t in range(0, 40, 4)}
    assert window_mean(every_4th, "first", n=10, tasks=range(40)) == 4.0  # tasks 0, 4, 8
    assert window_mean(every_4th, "last", n=10, tasks=range(40)) == 34.0  # tasks 32, 36
    assert math.isnan(window_mean({0: 1.0}, "last", n=2, tasks=range(5)))
    # The failed variant has no seed: NaN, not an error.
    failed = study.groups("tiny")[("l2", "l2_coef=10")]
    assert math.isnan(window_stats(failed, "end_accuracy", "last")[0])
    assert len(seed_stats(failed, "end_accuracy").tasks) == 0


def test_best_variant_is_the_highest_last_accuracy(tiny_study: TinyStudy) -> None:
    study = load_study(tiny_study.root)
    last = {cid: np.mean([t["end_accuracy"] for t in tasks][-10:])
            for cid, tasks in tiny_study.tasks.items()}
    l2 = {"l2_coef=0.01": last["tiny-l2-l2_coef=0.01-s0"],
          "l2_coef=0.1": last["tiny-l2-l2_coef=0.1-s0"]}
    assert best_variants(study) == {("tiny", "none"): "default",
                                    ("tiny", "l2"): max(l2, key=l2.get)}
    summaries = summarize(study)
    assert [g.seeds_done for g in summaries] == [2, 1, 1, 0]
    assert sum(g.best for g in summaries) == 2
    assert summaries[0].score_key == "end_accuracy"


def test_regression_runs_are_scored_by_loss(tmp_path: Path) -> None:
    """A regression stream logs task/end_loss but no accuracy: lowest loss is best."""
    for k, losses in enumerate([(1.0, 0.5), (1.0, 0.2), (1.0, 0.9)]):
        folder = tmp_path / "runs" / f"reg{k}" / "version_0"
        folder.mkdir(parents=True)
        rows = "".join(f"{t},{t * 5 + 4},{v}\n" for t, v in enumerate(losses))
        (folder / "metrics.csv").write_text("epoch,step,task/end_loss\n" + rows)
    study = load_study(tmp_path / "runs")
    assert score_key(study.done()) == "end_loss"
    assert best_variants(study) == {(f"reg{k}", "run"): "default" for k in range(3)}
    lasts = {g.recipe: g.last_score[0] for g in summarize(study, n=1)}
    assert lasts == {"reg0": 0.5, "reg1": 0.2, "reg2": 0.9}


def test_regression_prefers_the_validation_mse_over_the_training_loss(tmp_path: Path) -> None:
    """A categorical loss trains on cross-entropy: runs are compared by the validation MSE."""
    for k, (train, val) in enumerate([((2.0, 2.1), (0.5, 0.6)), ((0.1, 0.1), (9.0, 8.0))]):
        folder = tmp_path / "runs" / f"reg{k}" / "version_0"
        folder.mkdir(parents=True)
        rows = "".join(f"{t},{t * 5 + 4},{a},\n{t},{t * 5 + 4},,{b}\n"
                       for t, (a, b) in enumerate(zip(train, val)))
        (folder / "metrics.csv").write_text("epoch,step,task/end_loss,task/val_loss\n" + rows)
    study = load_study(tmp_path / "runs")
    assert score_key(study.done()) == "val_loss"
    lasts = {g.recipe: g.last_score[0] for g in summarize(study, n=1)}
    assert lasts == {"reg0": 0.6, "reg1": 8.0}


def test_spearman_matches_scipy_on_the_collected_points(tiny_study: TinyStudy) -> None:
    xs, ys = [], []
    for cid, history in tiny_study.hessian.items():
        starts = [h for h in history if h["event"] == "task_start"]
        xs += [h[EPS] / h["curvature/hessian_num_params"] for h in starts]
        ys += [t["end_accuracy"] for t in tiny_study.tasks[cid]]
    corr = eps_rank_correlation(load_study(tiny_study.root), "tiny")
    assert corr.n == len(CELLS) * NUM_TASKS
    assert sorted(zip(corr.x, corr.y)) == sorted(zip(xs, ys))
    expected = spearmanr(xs, ys)
    assert corr.rho == pytest.approx(expected[0])
    assert corr.pvalue == pytest.approx(expected[1])
    assert (corr.slope, corr.intercept) == pytest.approx(tuple(np.polyfit(xs, ys, 1)))
    assert sorted(set(corr.methods)) == ["l2", "none"]


# ---------------------------------------------------------------------------- bad input
def test_bad_paths_say_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_study(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no study.json and no metrics.csv"):
        load_study(tmp_path)
    with pytest.raises(FileNotFoundError, match="CSVLogger run"):
        load_run(tmp_path)
    (tmp_path / "study.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        load_study(tmp_path)
    with pytest.raises(ValueError, match="'first' or 'last'"):
        window_mean({0: 1.0}, "middle")  # type: ignore[arg-type]


def test_only_the_grid_of_study_json_is_collected(tmp_path: Path) -> None:
    """Folders moved aside (``.stale-*``) or left from an earlier grid are not this study."""
    cell = {"id": "r__plain__default__seed0", "recipe": "r", "method": "plain",
            "variant": "default", "seed": 0}
    (tmp_path / "study.json").write_text(json.dumps({"name": "s", "cells": [cell]}))
    for name in (cell["id"], cell["id"] + ".stale-1", "r__old__default__seed0"):
        run = tmp_path / "cells" / name / "runs" / "x" / "version_0"
        run.mkdir(parents=True)
        (run / "metrics.csv").write_text("epoch,step,task/end_accuracy\n0,4,0.5\n")
        (tmp_path / "cells" / name / "status.json").write_text('{"state": "done"}')
    study = load_study(tmp_path)
    assert [c.id for c in study.cells] == [cell["id"]]
