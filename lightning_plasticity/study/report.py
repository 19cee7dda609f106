"""The figures and the Markdown report of a study (or of any folder of runs).

:func:`write_report` collects ``path`` with :func:`.collect.load_study` and writes, into
``out_dir``:

* ``task_end_accuracy.png``: task-end accuracy (loss for regression) per task, one panel per
  recipe, one line per method (its best variant: mean over seeds, shaded +- one std; the other
  variants thin and faded);
* ``eps_rank.png``: the Hessian eps-rank at each task's start, same layout;
* ``accuracy_vs_eps_rank.png``: task-end accuracy against the normalized eps-rank at the task's
  start, every (cell, task) of a recipe, colored by method, with a least-squares line and
  Spearman's rho;
* ``spectra.png``: the recorded top Hessian eigenvalues at a few tasks, per recipe and method
  (best variant, one seed);
* ``<metric>.png`` for each extra metric asked for;
* ``report.md``: per recipe a table of methods and variants (first/last tasks, best variant
  marked), the rank correlation, the failed or unfinished cells and the figures.

Pure: matplotlib figures are made without pyplot (no global backend, no window).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lightning_plasticity.study.collect import (
    CellResult,
    Correlation,
    GroupSummary,
    Study,
    eps_rank_correlation,
    load_study,
    score_key,
    seed_stats,
    summarize,
    task_series,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["sanitize", "write_report"]

_SPECTRUM = "hessian_top_eigenvalues"
_LABELS = {"end_accuracy": "task-end accuracy", "end_loss": "task-end loss",
           "val_loss": "validation MSE at task end",
           "eps_rank": "eps-rank at task start",
           "normalized_eps_rank": "normalized eps-rank at task start"}


def sanitize(name: str) -> str:
    """A metric name as a file name stem: ``"curvature/entk_rank"`` -> ``"curvature_entk_rank"``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "metric"


def _figure(panels: int, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _colors(study: Study) -> dict[str, str]:
    methods = list(dict.fromkeys(c.method for c in study.cells))
    return {m: f"C{i % 10}" for i, m in enumerate(methods)}


def _has(cells: Sequence[CellResult], key: str) -> bool:
    return any(c.run is not None and task_series(c.run, key) for c in cells if c.ok)


def _per_task_figure(study: Study, summaries: list[GroupSummary], key: str | None,
                     path: Path) -> bool:
    """Per recipe a panel of ``key`` (None: the recipe's score) per task, per method's best
    variant; False (nothing written) when no finished cell has ``key``."""
    recipes = [r for r in study.recipes()
               if _has(study.done(r), key or score_key(study.done(r)))]
    if not recipes:
        return False
    from matplotlib.ticker import MaxNLocator

    colors = _colors(study)
    fig, axes = _figure(len(recipes))
    for ax, recipe in zip(axes, recipes):
        recipe_key = key or score_key(study.done(recipe))
        for g in (g for g in summaries if g.recipe == recipe):
            stats = seed_stats(g.cells, recipe_key)
            if not len(stats.tasks):
                continue
            color = colors[g.method]
            if g.best:
                label = g.method if g.variant == "default" else f"{g.method} ({g.variant})"
                ax.plot(stats.tasks, stats.mean, color=color, lw=2,
                        label=f"{label}, {int(stats.count.max())} seed(s)")
                ax.fill_between(stats.tasks, stats.mean - stats.std, stats.mean + stats.std,
                                color=color, alpha=0.2, lw=0)
            else:
                ax.plot(stats.tasks, stats.mean, color=color, lw=0.8, alpha=0.35)
        ax.set(title=recipe, xlabel="task", ylabel=_LABELS.get(recipe_key, recipe_key))
        means = np.concatenate([line.get_ydata() for line in ax.get_lines()] or [[1.0]])
        means = means[np.isfinite(means)]
        if (recipe_key.endswith("loss") and means.size and means.min() > 0
                and means.max() / means.min() > 100):
            ax.set_yscale("log")  # losses over decades: one method's start hides the rest
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return True


def _scatter_figure(study: Study, path: Path) -> list[Correlation]:
    """``accuracy_vs_eps_rank.png``; returns the recipes' correlations (empty: not written)."""
    correlations = [c for c in (eps_rank_correlation(study, r) for r in study.recipes()) if c.n]
    if not correlations:
        return []
    colors = _colors(study)
    fig, axes = _figure(len(correlations))
    for ax, corr in zip(axes, correlations):
        methods = np.asarray(corr.methods)
        for method in dict.fromkeys(corr.methods):
            m = methods == method
            ax.scatter(corr.x[m], corr.y[m], s=14, alpha=0.7, color=colors[method],
                       label=method)
        if math.isfinite(corr.slope):
            xs = np.linspace(corr.x.min(), corr.x.max(), 2)
            ax.plot(xs, corr.slope * xs + corr.intercept, color="black", lw=1,
                    label=f"fit, slope {corr.slope:.3g}")
        ax.set(title=f"{corr.recipe}: Spearman rho = {corr.rho:.2f} (n = {corr.n})",
               xlabel=_LABELS["normalized_eps_rank"], ylabel=_LABELS[corr.score_key])
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return correlations


def _spectrum(cell: CellResult) -> tuple[str, dict[int, list[float]]] | None:
    """The cell's top-eigenvalue spectra at task starts (else any event): ``(event, task ->
    values)``."""
    run = cell.run
    if run is None:
        return None
    for event in ("task_start", "fit_start", "task_end", "epoch_end", "step"):
        per_task = {t: v for t, spectra in run.spectra.get(event, {}).items()
                    for name, v in spectra.items() if name.endswith(_SPECTRUM) and v}
        if per_task:
            return event, dict(sorted(per_task.items()))
    return None


def _pick_tasks(measured: list[int], wanted: Sequence[int] | None) -> list[int]:
    if wanted is not None:
        return [t for t in wanted if t in measured]
    return list(dict.fromkeys([measured[0], measured[len(measured) // 2], measured[-1]]))


def _spectra_figure(study: Study, summaries: list[GroupSummary], path: Path,
                    tasks: Sequence[int] | None) -> bool:
    panels = []
    for g in (g for g in summaries if g.best):
        for cell in sorted((c for c in g.cells if c.ok), key=lambda c: c.seed):
            found = _spectrum(cell)
            if found is not None:
                chosen = _pick_tasks(list(found[1]), tasks)
                if chosen:
                    panels.append((g, cell, found[0], {t: found[1][t] for t in chosen}))
                break
    if not panels:
        return False
    fig, axes = _figure(len(panels), width=4.5)
    for ax, (g, cell, event, spectra) in zip(axes, panels):
        peak = 0.0
        for task, values in spectra.items():
            v = np.sort(np.asarray(values, dtype=float))[::-1]
            v = v[np.isfinite(v)]
            if v.size:
                peak = max(peak, float(np.abs(v).max()))
                ax.plot(np.arange(1, v.size + 1), v, marker=".", label=f"task {task}")
        # symlog: eigenvalues can be negative; linear within 1e-3 of the largest magnitude
        ax.set_yscale("symlog", linthresh=max(peak * 1e-3, 1e-12))
        ax.set(title=f"{g.recipe} / {g.method} (seed {cell.seed})", xlabel="index",
               ylabel=f"eigenvalue ({event})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return True


def _fmt(stats: tuple[float, float, int], digits: int = 3) -> str:
    mean, std, n = stats
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.{digits}g} ± {std:.2g}" if n > 1 else f"{mean:.{digits}g}"


def _cell_text(text: str) -> str:
    return text.replace("|", "\\|")


def _table(groups: list[GroupSummary], window: int) -> list[str]:
    what = "acc" if groups[0].score_key == "end_accuracy" else "loss"
    head = ["method", "variant", "seeds done", f"first-{window} {what}",
            f"last-{window} {what}", f"first-{window} eps-rank", f"last-{window} eps-rank",
            f"last-{window} normalized eps-rank"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        variant = _cell_text(g.variant) + (" **best**" if g.best else "")
        row = [_cell_text(g.method), variant, f"{g.seeds_done}/{len(g.cells)}",
               _fmt(g.first_score), _fmt(g.last_score), _fmt(g.first_eps_rank, 4),
               _fmt(g.last_eps_rank, 4), _fmt(g.last_normalized_eps_rank)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _problem_line(cell: CellResult, out_dir: Path) -> str:
    why = cell.state
    if cell.returncode is not None:
        why += f", returncode {cell.returncode}"
    if cell.error and cell.state != "failed":
        why += f": {cell.error}"
    line = (f"- `{cell.id}` ({cell.recipe} / {cell.method} / {cell.variant}, seed {cell.seed}): "
            f"{why}")
    log = cell.path / "output.log"
    if log.is_file():
        line += f" — [output.log]({Path(os.path.relpath(log, out_dir)).as_posix()})"
    return line


def write_report(path: str | os.PathLike | Study, out_dir: str | os.PathLike | None = None,
                 tasks_for_spectra: Sequence[int] | None = None,
                 metrics: Sequence[str] | None = None, window: int = 10) -> Path:
    """Write the figures and ``report.md`` of a study or of a folder of runs.

    Args:
        path: a study folder (with ``study.json``), any folder with runs below it, or a
            collected :class:`~.collect.Study`.
        out_dir: where to write; default ``<path>/report``.
        tasks_for_spectra: tasks whose spectra to draw (default: the first, middle and last
            measured).
        metrics: further metrics to draw per task, one PNG each (e.g.
            ``"curvature/entk_rank"``, ``"params/total/norm"``, ``"task/online_accuracy"``;
            ``"name@task_end"`` for one event).
        window: how many first and last tasks the table averages.

    Returns:
        The path of ``report.md``.

    Raises:
        FileNotFoundError: when ``path`` holds no study and no runs.
        ValueError: for a ``window`` below 1.
    """
    if window < 1:
        raise ValueError(f"write_report: window must be >= 1, got {window}.")
    study = path if isinstance(path, Study) else load_study(path)
    out = Path(out_dir) if out_dir is not None else study.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    summaries = summarize(study, window)

    figures: list[tuple[str, str]] = []
    notes: list[str] = []
    if _per_task_figure(study, summaries, None, out / "task_end_accuracy.png"):
        figures.append(("task-end accuracy (or loss) per task", "task_end_accuracy.png"))
    else:
        notes.append("No finished run has task-end metrics: no task_end_accuracy.png.")
    if _per_task_figure(study, summaries, "eps_rank", out / "eps_rank.png"):
        figures.append(("eps-rank at task start", "eps_rank.png"))
    else:
        notes.append("No run measured the Hessian eps-rank (add HessianRankCallback and "
                     "HistoryWriter to the recipe): no eps_rank.png and no "
                     "accuracy_vs_eps_rank.png.")
    correlations = {c.recipe: c for c in _scatter_figure(study, out / "accuracy_vs_eps_rank.png")}
    if correlations:
        figures.append(("task-end accuracy vs normalized eps-rank",
                        "accuracy_vs_eps_rank.png"))
    if _spectra_figure(study, summaries, out / "spectra.png", tasks_for_spectra):
        figures.append(("top Hessian eigenvalues", "spectra.png"))
    else:
        notes.append("No run recorded Hessian eigenvalues (or none at the tasks asked for): "
                     "no spectra.png.")
    for name in metrics or []:
        file = f"{sanitize(name)}.png"
        if _per_task_figure(study, summaries, name, out / file):
            figures.append((name, file))
        else:
            notes.append(f"No finished run has `{name}`: no {file}.")

    done, total = len(study.done()), len(study.cells)
    if study.is_study:
        collected = f"{done} of {total} cells finished with metrics."
    else:  # run folders have no status: a run may have been interrupted, show its tasks
        tasks = ", ".join(f"{c.recipe}: {len(c.run.tasks)} tasks" for c in study.done()
                          if c.run is not None)
        collected = f"{done} run(s) with metrics ({tasks})."
    lines = [f"# Study report: {study.name}", "",
             f"Collected from `{study.path}`: {collected}",
             f"Table values: mean ± std over seeds of each seed's mean over its first or last "
             f"{window} tasks; eps-rank at task start.", ""]
    for recipe in study.recipes():
        lines += [f"## {recipe}", ""]
        lines += _table([g for g in summaries if g.recipe == recipe], window)
        corr = correlations.get(recipe)
        lines.append("")
        if corr is not None and math.isfinite(corr.rho):
            lines.append(f"Spearman's rho between the normalized eps-rank at task start and the "
                         f"{_LABELS[corr.score_key]}: **{corr.rho:.3f}** (p = {corr.pvalue:.3g}, "
                         f"n = {corr.n} cell-tasks); least-squares slope {corr.slope:.4g}.")
        else:
            lines.append("Spearman's rho: not available (fewer than 3 tasks with both the "
                         "eps-rank and a task-end score, or a constant one).")
        lines.append("")
    lines += ["## Failed or unfinished cells", ""]
    problems = study.problems()
    lines += [_problem_line(c, out) for c in problems] if problems else ["None."]
    lines += ["", "## Figures", ""]
    for title, file in figures:
        lines += [f"### {title}", "", f"![{title}]({file})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
