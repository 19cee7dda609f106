"""The ``lightning-plasticity`` command: a LightningCLI over the package's classes.

Model and data module are in subclass mode, so a recipe may name any LightningModule and
LightningDataModule by class path; the package's own classes (and its callbacks) are imported
here so YAML can name them by their short class names (``ContinualClassifier``, ``MLP``,
``ContinualDataModule``, ``TaskMetricsPlot``).
"""

from __future__ import annotations

import os
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


def main() -> None:
    """Entry point of the ``lightning-plasticity`` console script."""
    run_cli()


if __name__ == "__main__":
    main()
