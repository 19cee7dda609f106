"""report: every figure and the Markdown report of the tiny study, and of a single run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from lightning_plasticity.study.collect import load_study
from lightning_plasticity.study.report import sanitize, write_report
from tests.study.test_collect import EPS, FAILED_ID, TinyStudy, copy_study, shared_tiny_study


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> TinyStudy:
    return shared_tiny_study(tmp_path_factory)


FIGURES = ["task_end_accuracy.png", "eps_rank.png", "accuracy_vs_eps_rank.png", "spectra.png"]


def _table_rows(markdown: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in markdown.splitlines() if line.startswith("| ")]
    return rows[1:]  # without the header


def test_study_report(tiny_study: TinyStudy, tmp_path: Path) -> None:
    out = tmp_path / "report"
    report = write_report(tiny_study.root, out, metrics=["curvature/grad_norm", "params/none"])
    assert report == out / "report.md"
    for name in [*FIGURES, "curvature_grad_norm.png"]:
        assert (out / name).stat().st_size > 1000, name
    assert not (out / "params_none.png").exists()
    text = report.read_text()

    rows = _table_rows(text)
    assert [(r[0], r[1].replace(" **best**", "")) for r in rows] == [
        ("none", "default"), ("l2", "l2_coef=0.01"), ("l2", "l2_coef=0.1"),
        ("l2", "l2_coef=10")]
    assert [r[2] for r in rows] == ["2/2", "1/1", "1/1", "0/1"]
    last = {cid: np.mean([t["end_accuracy"] for t in tasks][-10:])
            for cid, tasks in tiny_study.tasks.items()}
    best_l2 = "l2_coef=0.01" if last["tiny-l2-l2_coef=0.01-s0"] >= \
        last["tiny-l2-l2_coef=0.1-s0"] else "l2_coef=0.1"
    assert [r[1] for r in rows if "**best**" in r[1]] == ["default **best**",
                                                          f"{best_l2} **best**"]
    # the last-10 eps-rank of a single-seed variant is its own mean over tasks
    eps = [h[EPS] for h in tiny_study.hessian["tiny-l2-l2_coef=0.1-s0"]]
    assert rows[2][6] == f"{np.mean(eps):.4g}"
    assert rows[3][3] == "—"

    problems = text.split("## Failed or unfinished cells")[1].split("##")[0]
    assert FAILED_ID in problems and "returncode 1" in problems
    assert "output.log" in problems and "tiny-none-default-s0" not in problems

    xs, ys = [], []
    for cid, history in tiny_study.hessian.items():
        xs += [h[EPS] / h["curvature/hessian_num_params"] for h in history]
        ys += [t["end_accuracy"] for t in tiny_study.tasks[cid]]
    rho = float(re.search(r"Spearman's rho .*?\*\*(-?[\d.]+)\*\*", text).group(1))
    assert rho == pytest.approx(spearmanr(xs, ys)[0], abs=5e-4)
    for name in [*FIGURES, "curvature_grad_norm.png"]:
        assert f"]({name})" in text
    assert "No finished run has `params/none`" in text


def test_default_out_dir_and_single_run(tiny_study: TinyStudy, tmp_path: Path) -> None:
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_study.root / "cells" / "tiny-none-default-s1" / "runs" / "tiny", run_dir)
    report = write_report(run_dir, tasks_for_spectra=[0, 2])
    assert report == run_dir / "report" / "report.md"
    for name in FIGURES:
        assert (run_dir / "report" / name).stat().st_size > 1000, name
    rows = _table_rows(report.read_text())
    assert [r[:3] for r in rows] == [["run", "default **best**", "1/1"]]
    assert "None." in report.read_text()  # no failed cells
    # Reading the folder again ignores the report written into it.
    assert [c.id for c in load_study(run_dir).cells] == ["tiny"]


def test_without_measurements_figures_are_skipped_with_a_note(tiny_study: TinyStudy,
                                                             tmp_path: Path) -> None:
    root = copy_study(tiny_study, tmp_path)
    for path in root.rglob("histories.json"):
        path.unlink()
    report = write_report(root, tmp_path / "out", tasks_for_spectra=[99])
    assert (tmp_path / "out" / "task_end_accuracy.png").stat().st_size > 1000
    for name in FIGURES[1:]:
        assert not (tmp_path / "out" / name).exists()
    text = report.read_text()
    assert "No run measured the Hessian eps-rank" in text
    assert "Spearman's rho: not available" in text


def test_spectra_only_at_tasks_measured(tiny_study: TinyStudy, tmp_path: Path) -> None:
    report = write_report(load_study(tiny_study.root), tmp_path, tasks_for_spectra=[99])
    assert not (tmp_path / "spectra.png").exists()
    assert "no spectra.png" in report.read_text()


def test_bad_input() -> None:
    assert sanitize("curvature/entk_rank") == "curvature_entk_rank"
    with pytest.raises(ValueError, match="window must be >= 1"):
        write_report(".", window=0)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        write_report("/nonexistent/study")
