"""A saved wandb workspace for a plasticity project: ``lightning-plasticity dashboard``.

:data:`DASHBOARD` is the layout, as plain data: sections of panels, every metric panel against
``task/id`` (what :class:`~lightning_plasticity.callbacks.WandbTaskAxis` defines in the runs), the
spectra as a line-per-task chart of their ``(task, index, eigenvalue)`` tables and the accuracy vs
eps-rank scatter plot logged at the end of fit. :func:`build_workspace` turns it into a
``wandb_workspaces.workspaces.Workspace`` (the optional ``dashboard`` extra:
``pip install 'lightning-plasticity[dashboard]'``); :func:`workspace_spec` is the JSON that wandb
would store, with no network; :func:`save_workspace` saves it to wandb (needs ``wandb login``).
A user runs it once per project and every run of the project appears in that layout.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from lightning_plasticity.callbacks.wandb_task_axis import (
    SCATTER_KEY,
    TASK_AXIS,
    spectrum_table_key,
)

__all__ = [
    "DASHBOARD",
    "DashboardUnavailable",
    "PanelSpec",
    "SectionSpec",
    "build_workspace",
    "layout_spec",
    "save_workspace",
    "workspace_spec",
]

#: the default name of the saved workspace
DEFAULT_NAME = "Plasticity dashboard"
_GLOBAL_STEP = "trainer/global_step"


@dataclass(frozen=True)
class PanelSpec:
    """One panel: a line plot of ``metrics`` against ``x``, or a custom chart of a table.

    Attributes:
        title: the panel's title.
        metrics: the plotted keys (a line plot), or the one table key (a chart).
        kind: ``"line"``, ``"spectrum"`` (one line per task of a ``(task, index, eigenvalue)``
            table) or ``"scatter"`` (the ``wandb.plot.scatter`` table of a run).
        x: the x-axis metric of a line plot; the x column of a chart.
        y: the y column of a chart (unused by a line plot).
        log_y: a logarithmic y-axis.
    """

    title: str
    metrics: tuple[str, ...]
    kind: Literal["line", "spectrum", "scatter"] = "line"
    x: str = TASK_AXIS
    y: str | None = None
    log_y: bool = False


@dataclass(frozen=True)
class SectionSpec:
    """A named section of panels."""

    name: str
    panels: tuple[PanelSpec, ...] = field(default_factory=tuple)


def _line(title: str, *metrics: str, log_y: bool = False) -> PanelSpec:
    return PanelSpec(title=title, metrics=metrics, log_y=log_y)


#: The workspace, section by section. Metric panels are against ``task/id``; the Training
#: section (per-step losses) against the global step.
DASHBOARD: tuple[SectionSpec, ...] = (
    SectionSpec("Task performance", (
        _line("Task-end accuracy", "task/end_accuracy"),
        _line("Online accuracy", "task/online_accuracy"),
        _line("Steps to target", "task/steps_to_target"),
        _line("Task-end loss", "task/end_loss"),
        _line("Trainable (tau)", "task/trainable"),
        _line("Validation accuracy", "task/val_accuracy"),
    )),
    SectionSpec("Curvature", (
        _line("Hessian eps-rank", "curvature/hessian_eps_rank"),
        _line("Normalised eps-rank", "curvature/hessian_eps_rank_normalized"),
        _line("Top Hessian eigenvalue", "curvature/hessian_top_eigenvalue", log_y=True),
        _line("Gradient-Hessian overlap", "curvature/grad_hessian_overlap"),
        _line("KFAC eps-rank", "curvature/kfac_eps_rank"),
        _line("eNTK rank", "curvature/entk_rank"),
        _line("eNTK condition number", "curvature/entk_condition_number", log_y=True),
        PanelSpec("Top Hessian eigenvalues per task",
                  (spectrum_table_key("curvature/hessian_top_eigenvalues"),),
                  kind="spectrum", x="index", y="eigenvalue"),
        PanelSpec("Task-end accuracy vs normalised eps-rank", (f"{SCATTER_KEY}_table",),
                  kind="scatter", x="hessian_eps_rank_normalized", y="end_accuracy"),
    )),
    SectionSpec("Units and features", (
        _line("Dead units", "units/dead_fraction"),
        _line("Dormant units", "units/dormant_fraction"),
        _line("Feature effective rank", "features/effective_rank"),
        _line("Feature srank", "features/srank"),
        _line("Gradient interference (mean cosine)", "grads/mean_cosine"),
        _line("Plasticity probe (relative final loss)", "plasticity/relative_final_loss"),
    )),
    SectionSpec("Parameters", (
        _line("Weight norm", "params/total/norm"),
        _line("Distance from initialisation", "params/total/distance_from_init"),
        _line("Wasserstein distance from initialisation", "params/total/wasserstein"),
        _line("Update size per task", "params/total/update_norm"),
    )),
    SectionSpec("Interventions", (
        _line("ReDo: dormant fraction", "intervention/redo_dormant_fraction"),
        _line("ReDo: units reset", "intervention/redo_reset_units"),
        _line("Continual backprop: units replaced", "intervention/cbp_replaced_units"),
    )),
    SectionSpec("Training", (
        PanelSpec("Training loss", ("task/train_loss",), x=_GLOBAL_STEP),
        PanelSpec("Training accuracy", ("task/train_accuracy",), x=_GLOBAL_STEP),
    )),
)


class DashboardUnavailable(RuntimeError):
    """``wandb-workspaces`` is not installed (the ``dashboard`` extra)."""


def layout_spec(entity: str, project: str, name: str = DEFAULT_NAME,
                sections: tuple[SectionSpec, ...] = DASHBOARD) -> dict[str, Any]:
    """The layout as plain JSON-ready data (no wandb library needed).

    Example::

        >>> spec = layout_spec("me", "plasticity")
        >>> [s["name"] for s in spec["sections"]][:2]
        ['Task performance', 'Curvature']
        >>> spec["sections"][0]["panels"][0]
        {'title': 'Task-end accuracy', 'metrics': ['task/end_accuracy'], 'kind': 'line', \
'x': 'task/id', 'y': None, 'log_y': False}
    """
    return {"entity": entity, "project": project, "name": name,
            "sections": [{"name": s.name,
                          "panels": [{**asdict(p), "metrics": list(p.metrics)}
                                     for p in s.panels]}
                         for s in sections]}


def _modules() -> tuple[Any, Any]:
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as err:
        raise DashboardUnavailable(
            "the dashboard needs the wandb-workspaces library: pip install "
            "'lightning-plasticity[dashboard]' (or pip install wandb-workspaces)") from err
    return ws, wr


def _panel(wr: Any, panel: PanelSpec) -> Any:
    if panel.kind == "line":
        return wr.LinePlot(title=panel.title, x=panel.x, y=list(panel.metrics),
                           title_x="task" if panel.x == TASK_AXIS else "step",
                           log_y=panel.log_y or None)
    fields = {"x": panel.x, "y": panel.y}
    if panel.kind == "spectrum":
        fields["stroke"] = "task"
    # The query CustomChart.from_table builds, with the preset wandb.plot.line/scatter use.
    return wr.CustomChart(query={"summaryTable": {"tableKey": panel.metrics[0]}},
                          chart_name="wandb/line/v0" if panel.kind == "spectrum"
                          else "wandb/scatter/v0",
                          chart_fields=fields, chart_strings={"title": panel.title})


def build_workspace(entity: str, project: str, name: str = DEFAULT_NAME,
                    sections: tuple[SectionSpec, ...] = DASHBOARD) -> Any:
    """The layout as a ``wandb_workspaces.workspaces.Workspace`` (nothing is sent).

    Raises:
        DashboardUnavailable: without the ``wandb-workspaces`` library.
        ValueError: for an empty ``entity``, ``project`` or ``name``.
    """
    for label, value in (("entity", entity), ("project", project), ("name", name)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"dashboard: {label} must be a non-empty name, got {value!r}.")
    ws, wr = _modules()
    return ws.Workspace(
        entity=entity, project=project, name=name,
        settings=ws.WorkspaceSettings(x_axis=TASK_AXIS),
        sections=[ws.Section(
            name=s.name, is_open=True,
            panel_settings=ws.SectionPanelSettings(
                x_axis=_GLOBAL_STEP if all(p.x == _GLOBAL_STEP for p in s.panels)
                else TASK_AXIS),
            panels=[_panel(wr, p) for p in s.panels]) for s in sections])


def workspace_spec(workspace: Any) -> dict[str, Any]:
    """What wandb stores for ``workspace`` (its view, as the library serialises it), as
    JSON-ready data; no network."""
    return workspace._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")


def save_workspace(workspace: Any) -> str:
    """Save ``workspace`` to wandb (needs ``wandb login`` or ``WANDB_API_KEY``); its URL."""
    saved = workspace.save()
    return str(saved.url)


def dry_run_json(entity: str, project: str, name: str = DEFAULT_NAME) -> tuple[str, bool]:
    """The ``--dry-run`` output: ``(json, from_library)``; the library's workspace spec, or the
    plain layout when ``wandb-workspaces`` is not installed."""
    try:
        spec, from_library = workspace_spec(build_workspace(entity, project, name)), True
    except DashboardUnavailable:
        spec, from_library = layout_spec(entity, project, name), False
    return json.dumps(spec, indent=2), from_library
