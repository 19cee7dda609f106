"""The ``lightning-plasticity`` command: a LightningCLI over the package's classes.

Model and data module are in subclass mode, so a recipe may name any LightningModule and
LightningDataModule by class path; the package's own classes (and its callbacks) are imported
here so YAML can name them by their short class names (``ContinualClassifier``, ``MLP``,
``ContinualDataModule``, ``TaskMetricsPlot``).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lightning_plasticity.callbacks  # registers short names for YAML
import lightning_plasticity.data
import lightning_plasticity.models
import lightning_plasticity.regularizers

_IMPORT_PATH_ERRORS = (
    re.compile(r"Expected a dot import path string: (\S+)"),
    re.compile(r"Import path (\S+) does not correspond"),
)


def known_class_names() -> list[str]:
    """Short class names a recipe may use: the package's and Lightning's callbacks/loggers."""
    import lightning.pytorch.callbacks as pl_callbacks
    import lightning.pytorch.loggers as pl_loggers

    modules = [lightning_plasticity.callbacks, lightning_plasticity.data,
               lightning_plasticity.models, lightning_plasticity.regularizers, pl_callbacks,
               pl_loggers]
    return sorted({name for m in modules for name in getattr(m, "__all__", [])})


def class_name_hint(message: str) -> str | None:
    """A "did you mean ...?" for an unknown class name in a parser error, or None.

    Example::

        >>> class_name_hint("Expected a dot import path string: ContinualClasifier")
        "unknown class 'ContinualClasifier'; did you mean 'ContinualClassifier'?"
    """
    for pattern in _IMPORT_PATH_ERRORS:
        found = pattern.search(message)
        if found:
            name = found.group(1).rstrip(".,:")
            close = difflib.get_close_matches(name.rsplit(".", 1)[-1], known_class_names(), n=1)
            if close:
                return (f"unknown class {name!r}; did you mean "
                        f"{' or '.join(repr(c) for c in close)}?")
            return f"unknown class {name!r}"
    return None


class PlasticityArgumentParser(LightningArgumentParser):
    """Puts the package's own message first: an unknown class name gets a "did you mean"."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        hint = class_name_hint(message)
        if hint is not None:
            message = f"{hint}\n{message}"
        super().error(message, ex)


class PlasticityCLI(LightningCLI):
    """LightningCLI with the package's defaults: a continual classifier on the digits stream."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults({
            "model": {"class_path": "lightning_plasticity.models.ContinualClassifier"},
            "data": {"class_path": "lightning_plasticity.data.ContinualDataModule"},
        })


def run_cli(args: list[str] | None = None) -> PlasticityCLI:
    """Run the CLI with ``args`` (default: ``sys.argv``) and return it (for tests and scripts)."""
    # wandb never needs an account or network unless the user asks for online mode.
    os.environ.setdefault("WANDB_MODE", "offline")
    return PlasticityCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        parser_class=PlasticityArgumentParser,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


_UNION_ERROR = "Does not validate against any of the Union subtypes"


def package_message(error: BaseException) -> str | None:
    r"""The package's own message inside jsonargparse's union error, or None.

    jsonargparse reports a class that rejects its arguments as a failed union match, listing
    the real error (ours: "num_tasks must be >= 1, got 0.") between its own lines.

    Example::

        >>> err = ValueError("Does not validate against any of the Union subtypes\n"
        ...                  "Subtypes: [...]\nErrors:\n  - num_tasks must be >= 1, got 0.\n"
        ...                  "  - Expected a <class 'NoneType'>\nGiven value type: ...")
        >>> package_message(err)
        'num_tasks must be >= 1, got 0.'
    """
    while error is not None:
        text = str(error)
        if _UNION_ERROR in text and "Errors:" in text:
            for line in text.split("Errors:", 1)[1].splitlines():
                line = line.strip()
                if line.startswith("- ") and "Expected a <class 'NoneType'>" not in line:
                    return line[2:]
        error = error.__cause__ or error.__context__
    return None


def study_main(argv: list[str]) -> int:
    """``lightning-plasticity study --config STUDY.yaml``: run a study's grid (see
    :mod:`lightning_plasticity.study`); returns the exit status (1 if a cell failed)."""
    import argparse

    from lightning_plasticity.study import load_study_spec, run_study

    parser = argparse.ArgumentParser(
        prog="lightning-plasticity study",
        description="Run every cell (recipe x method variant x seed) of a study that is not "
                    "finished yet, each as its own `lightning-plasticity fit` process.")
    parser.add_argument("--config", required=True, help="the study file (YAML)")
    parser.add_argument("--out", help="study folder (default runs/studies/<name>)")
    parser.add_argument("--jobs", type=int, default=1, help="cells at once (local)")
    parser.add_argument("--executor", default="local",
                        choices=["local", "submitit-local", "slurm"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every cell, e.g. data.init_args.num_tasks=5")
    parser.add_argument("--cell-timeout", type=float, help="seconds before a cell is killed")
    parser.add_argument("--dry-run", action="store_true", help="write the grid, run nothing")
    parser.add_argument("--report", action="store_true", help="write the report afterwards")
    args = parser.parse_args(argv)
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        extra[key.removeprefix("--")] = value
    try:
        spec = load_study_spec(args.config)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    result = run_study(spec, args.out, jobs=args.jobs, executor=args.executor,
                       extra_args=extra, cell_timeout=args.cell_timeout, dry_run=args.dry_run)
    print(result.summary())
    if args.report and not args.dry_run:
        from lightning_plasticity.study.report import write_report

        print(f"report: {write_report(result.study_dir, metrics=spec.report.get('metrics'))}")
    return 0 if result.ok else 1


def report_main(argv: list[str]) -> int:
    """``lightning-plasticity report DIR``: figures and a Markdown report of a study or run."""
    import argparse

    from lightning_plasticity.study.report import write_report

    parser = argparse.ArgumentParser(
        prog="lightning-plasticity report",
        description="Draw the figures and write report.md from a study folder or from any "
                    "folder holding runs (metrics.csv and histories.json), finished or not.")
    parser.add_argument("path", help="a study folder or a run's log folder")
    parser.add_argument("--out", help="where to write (default <path>/report)")
    parser.add_argument("--metrics", nargs="*", help="more per-task metrics to plot")
    args = parser.parse_args(argv)
    if not Path(args.path).is_dir():
        parser.error(f"no folder {args.path!r}")
    print(write_report(args.path, args.out, metrics=args.metrics))
    return 0


def dashboard_main(argv: list[str]) -> int:
    """``lightning-plasticity dashboard --entity E --project P``: save the plasticity workspace
    of a wandb project (see :mod:`lightning_plasticity.dashboard`); ``--dry-run`` prints its
    specification as JSON instead, without network."""
    import argparse

    from lightning_plasticity.dashboard import (
        DEFAULT_NAME,
        DashboardUnavailable,
        build_workspace,
        dry_run_json,
        save_workspace,
    )

    parser = argparse.ArgumentParser(
        prog="lightning-plasticity dashboard",
        description="Create a saved wandb workspace for a project: task performance, "
                    "curvature, units and features, parameters and interventions, every "
                    "panel against task/id. Run it once; every run of the project shows in it.")
    parser.add_argument("--entity", required=True, help="wandb user or team")
    parser.add_argument("--project", required=True, help="wandb project")
    parser.add_argument("--name", default=DEFAULT_NAME, help="the workspace's name")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the workspace specification as JSON; contact nothing")
    args = parser.parse_args(argv)
    try:
        if args.dry_run:
            text, from_library = dry_run_json(args.entity, args.project, args.name)
            if not from_library:
                print("lightning-plasticity dashboard: wandb-workspaces is not installed "
                      "(pip install 'lightning-plasticity[dashboard]'): printing the layout, "
                      "not the wandb workspace.", file=sys.stderr)
            print(text)
            return 0
        workspace = build_workspace(args.entity, args.project, args.name)
    except ValueError as err:
        parser.error(str(err))
    except DashboardUnavailable as err:
        print(f"lightning-plasticity dashboard: {err}", file=sys.stderr)
        return 2
    try:
        url = save_workspace(workspace)
    except Exception as err:  # no account, no network, a wrong entity or project
        print(f"lightning-plasticity dashboard: wandb could not save the workspace "
              f"({type(err).__name__}: {err}). Log in with `wandb login` (or set "
              "WANDB_API_KEY) and check --entity and --project.", file=sys.stderr)
        return 1
    print(f"saved the workspace {args.name!r} of {args.entity}/{args.project}: {url}")
    return 0


_COMMANDS = {"study": study_main, "report": report_main, "dashboard": dashboard_main}


def main() -> None:
    """Entry point of the ``lightning-plasticity`` console script.

    ``fit``/``validate``/... are LightningCLI's; ``study``, ``report`` and ``dashboard`` are the
    package's.
    A class that rejects its arguments shows its own message, not jsonargparse's union-error
    traceback (``LP_TRACEBACK=1`` shows that too).
    """
    if len(sys.argv) > 1 and sys.argv[1] in _COMMANDS:
        raise SystemExit(_COMMANDS[sys.argv[1]](sys.argv[2:]))
    try:
        run_cli()
    except (ValueError, TypeError) as err:
        message = package_message(err)
        if message is None or os.environ.get("LP_TRACEBACK"):
            raise
        print(f"lightning-plasticity: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
