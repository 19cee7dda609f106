"""Studies: grids of runs (recipes x method variants x seeds), their aggregation and report.

* :mod:`.grid` — the study file and its expansion into cells.
* :mod:`.runner` — each cell an ordinary ``lightning-plasticity fit`` in its own process,
  locally (``jobs``) or through ``submitit`` (SLURM); reruns skip finished cells.
* :mod:`.collect` — runs' ``metrics.csv`` and callback histories as per-task tables.
* :mod:`.report` — the figures and a Markdown report of a study or a single run.

The CLI faces: ``lightning-plasticity study --config STUDY.yaml [--jobs N]`` and
``lightning-plasticity report STUDY_OR_RUN_DIR``.
"""

from lightning_plasticity.study.grid import Cell, StudySpec, expand_study, load_study_spec
from lightning_plasticity.study.runner import StudyResult, run_cell, run_study

__all__ = ["Cell", "StudyResult", "StudySpec", "expand_study", "load_study_spec", "run_cell",
           "run_study"]
