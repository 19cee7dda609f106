"""The ``lightning-plasticity`` command: a LightningCLI over the package's classes.

Model and data module are in subclass mode, so a recipe may name any LightningModule and
LightningDataModule by class path; the package's own classes (and its callbacks) are imported
here so YAML can name them by their short class names (``ContinualClassifier``, ``MLP``,
``ContinualDataModule``, ``TaskMetricsPlot``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

import lightning_plasticity.callbacks  # noqa: F401 - registers short names for YAML
import lightning_plasticity.data  # noqa: F401
import lightning_plasticity.models  # noqa: F401
import lightning_plasticity.regularizers  # noqa: F401


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
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


_UNION_ERROR = "Does not validate against any of the Union subtypes"


def package_message(error: BaseException) -> str | None:
    """The package's own message inside jsonargparse's union error, or None.

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


def main() -> None:
    """Entry point of the ``lightning-plasticity`` console script.

    A class that rejects its arguments shows its own message, not jsonargparse's union-error
    traceback (``LP_TRACEBACK=1`` shows that too).
    """
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
