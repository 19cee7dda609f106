"""Plasticity measurements and plots as Lightning callbacks."""

from lightning_plasticity.callbacks.task_metrics_plot import TaskMetricsPlot

__all__ = ["TaskMetricsPlot"]
