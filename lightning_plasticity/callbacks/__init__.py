"""Plasticity measurements and plots as Lightning callbacks."""

from lightning_plasticity.callbacks.entk import ENTKCallback
from lightning_plasticity.callbacks.hessian_rank import HessianRankCallback
from lightning_plasticity.callbacks.kfac import KFACCallback
from lightning_plasticity.callbacks.measurement import MeasurementCallback, MeasurementSkipped
from lightning_plasticity.callbacks.task_metrics_plot import TaskMetricsPlot

__all__ = [
    "ENTKCallback",
    "HessianRankCallback",
    "KFACCallback",
    "MeasurementCallback",
    "MeasurementSkipped",
    "TaskMetricsPlot",
]
