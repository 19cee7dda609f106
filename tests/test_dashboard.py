"""``lightning-plasticity dashboard``: the saved wandb workspace of a plasticity project.

The ``--dry-run`` specification is built by the wandb-workspaces library (the ``dashboard``
extra) with the network cut off, and checked section by section and panel by panel; every metric
a panel plots is one the package's callbacks really log.
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
from typing import Any

import lightning.pytorch as pl
import pytest

import lightning_plasticity.dashboard as dashboard
from lightning_plasticity.callbacks import (
    ContinualBackprop,
    ENTKCallback,
    FeatureRankCallback,
    GradientInterferenceCallback,
    HessianRankCallback,
    KFACCallback,
    ParameterStatsCallback,
    PlasticityProbeCallback,
    ReDo,
    UnitActivityCallback,
)
from lightning_plasticity.cli import main
from tests.callbacks.helpers import small_classifier, small_stream

SECTIONS = ["Task performance", "Curvature", "Units and features", "Parameters",
            "Interventions", "Training"]
#: the panels the issue names, by section: title -> metric
NAMED = {
    "Task performance": {"Task-end accuracy": "task/end_accuracy",
                         "Online accuracy": "task/online_accuracy",
                         "Steps to target": "task/steps_to_target"},
    "Curvature": {"Hessian eps-rank": "curvature/hessian_eps_rank",
                  "Normalised eps-rank": "curvature/hessian_eps_rank_normalized",
                  "Top Hessian eigenvalue": "curvature/hessian_top_eigenvalue",
                  "Gradient-Hessian overlap": "curvature/grad_hessian_overlap",
                  "KFAC eps-rank": "curvature/kfac_eps_rank",
                  "eNTK rank": "curvature/entk_rank",
                  "eNTK condition number": "curvature/entk_condition_number"},
    "Units and features": {"Dead units": "units/dead_fraction",
                           "Dormant units": "units/dormant_fraction",
                           "Feature effective rank": "features/effective_rank"},
    "Parameters": {"Weight norm": "params/total/norm",
                   "Distance from initialisation": "params/total/distance_from_init"},
    "Interventions": {"ReDo: dormant fraction": "intervention/redo_dormant_fraction",
                      "Continual backprop: units replaced": "intervention/cbp_replaced_units"},
}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test: --dry-run must not contact wandb."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access during --dry-run: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["lightning-plasticity", "dashboard", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


def _dry_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> dict:
    code = _cli(monkeypatch, "--entity", "me", "--project", "plasticity", "--dry-run")
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out)


def test_dry_run_prints_the_workspace_with_every_section(
        no_network: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    spec = _dry_run(monkeypatch, capsys)
    assert (spec["entity"], spec["project"], spec["displayName"]) == \
        ("me", "plasticity", "Plasticity dashboard")
    view = spec["spec"]["section"]
    assert view["settings"]["xAxis"] == "task/id"
    assert view["settings"]["shouldAutoGeneratePanels"] is False  # curated, not a flat list
    sections = view["panelBankConfig"]["sections"]
    assert [s["name"] for s in sections] == SECTIONS
    for section in sections:
        if section["name"] == "Training":
            assert section["localPanelSettings"]["xAxis"] == "trainer/global_step"
            continue
        assert section["localPanelSettings"]["xAxis"] == "task/id"
        for panel in section["panels"]:
            if panel["viewType"] == "Run History Line Plot":
                assert panel["config"]["xAxis"] == "task/id", panel


def test_every_named_panel_plots_its_metric_against_tasks(
        no_network: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    sections = {s["name"]: s for s in
                _dry_run(monkeypatch, capsys)["spec"]["section"]["panelBankConfig"]["sections"]}
    for name, panels in NAMED.items():
        lines = {p["config"]["chartTitle"]: p["config"] for p in sections[name]["panels"]
                 if p["viewType"] == "Run History Line Plot"}
        for title, metric in panels.items():
            assert lines[title]["metrics"] == [metric], (name, title)
            assert lines[title]["xAxis"] == "task/id" and lines[title]["xAxisTitle"] == "task"


def test_the_spectra_and_the_scatter_are_charts_of_the_logged_tables(
        no_network: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    curvature = next(s for s in _dry_run(monkeypatch, capsys)["spec"]["section"]
                     ["panelBankConfig"]["sections"] if s["name"] == "Curvature")
    charts = {}
    for panel in curvature["panels"]:
        if panel["viewType"] != "Vega2":
            continue
        query = panel["config"]["userQuery"]["queryFields"][0]["fields"]
        table = next(f["args"][0]["value"] for f in query if f["name"] == "summaryTable")
        charts[table] = panel["config"]
    spectrum = charts["curvature/hessian_top_eigenvalues_table"]
    assert spectrum["panelDefId"] == "wandb/line/v0"
    assert spectrum["fieldSettings"] == {"x": "index", "y": "eigenvalue", "stroke": "task"}
    scatter = charts["curvature/accuracy_vs_eps_rank_table"]
    assert scatter["panelDefId"] == "wandb/scatter/v0"
    assert scatter["fieldSettings"] == {"x": "hessian_eps_rank_normalized", "y": "end_accuracy"}


def test_every_panel_metric_is_logged_by_the_package() -> None:
    """A renamed metric would leave an empty panel: fit with every measurement callback and
    the logging interventions, and find each line panel's metric among the logged ones."""
    callbacks = [HessianRankCallback(last_n_layers=1, probe_size=32, max_overhead=None),
                 KFACCallback(probe_size=32), ENTKCallback(probe_size=16),
                 UnitActivityCallback(probe_size=32), FeatureRankCallback(probe_size=32),
                 ParameterStatsCallback(), GradientInterferenceCallback(probe_size=16),
                 PlasticityProbeCallback(probe_size=32),
                 ReDo(probe_size=32, every_n_train_steps=1, on_task_start=False),
                 ContinualBackprop(replacement_rate=0.5, maturity_threshold=1, seed=0)]
    trainer = pl.Trainer(max_steps=4, log_every_n_steps=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tempfile.mkdtemp(),
                         callbacks=callbacks)
    trainer.fit(small_classifier(), datamodule=small_stream(num_tasks=2, steps_per_task=2,
                                                            val_size=32))
    plotted = {m for s in dashboard.DASHBOARD for p in s.panels if p.kind == "line"
               for m in p.metrics}
    assert plotted - set(trainer.callback_metrics) == set()


def test_without_the_library_dry_run_prints_the_layout(
        no_network: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # As if wandb-workspaces were not installed: importing it fails.
    monkeypatch.setitem(sys.modules, "wandb_workspaces.workspaces", None)
    monkeypatch.setitem(sys.modules, "wandb_workspaces.reports.v2", None)
    code = _cli(monkeypatch, "--entity", "me", "--project", "p", "--dry-run")
    captured = capsys.readouterr()
    assert code == 0 and "wandb-workspaces is not installed" in captured.err
    layout = json.loads(captured.out)
    assert [s["name"] for s in layout["sections"]] == SECTIONS
    first = layout["sections"][0]["panels"][0]
    assert (first["metrics"], first["x"]) == (["task/end_accuracy"], "task/id")
    # Saving needs the library: a clear message, no traceback.
    assert _cli(monkeypatch, "--entity", "me", "--project", "p") == 2
    assert "pip install 'lightning-plasticity[dashboard]'" in capsys.readouterr().err


def test_only_the_real_run_saves_and_a_failure_says_how_to_log_in(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    saved: list[Any] = []

    def save(workspace: Any) -> str:
        saved.append(workspace)
        return "https://wandb.ai/me/p?nw=abc"

    monkeypatch.setattr(dashboard, "save_workspace", save)
    assert _cli(monkeypatch, "--entity", "me", "--project", "p", "--dry-run") == 0
    assert saved == []
    assert _cli(monkeypatch, "--entity", "me", "--project", "p", "--name", "mine") == 0
    assert (saved[0].entity, saved[0].project, saved[0].name) == ("me", "p", "mine")
    assert "https://wandb.ai/me/p?nw=abc" in capsys.readouterr().out

    def refuse(workspace: Any) -> str:
        raise PermissionError("api_key not configured (no-tty)")

    monkeypatch.setattr(dashboard, "save_workspace", refuse)
    assert _cli(monkeypatch, "--entity", "me", "--project", "p") == 1
    assert "wandb login" in capsys.readouterr().err


def test_an_empty_name_is_refused_with_a_message(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(monkeypatch, "--entity", " ", "--project", "p", "--dry-run") == 2
    assert "entity must be a non-empty name" in capsys.readouterr().err
