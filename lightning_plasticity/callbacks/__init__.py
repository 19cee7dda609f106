"""Plasticity measurements and plots as Lightning callbacks."""

from lightning_plasticity.callbacks.entk import ENTKCallback
from lightning_plasticity.callbacks.feature_rank import FeatureRankCallback
from lightning_plasticity.callbacks.gradient_interference import GradientInterferenceCallback
from lightning_plasticity.callbacks.hessian_rank import HessianRankCallback
from lightning_plasticity.callbacks.history_writer import HistoryWriter
from lightning_plasticity.callbacks.kfac import KFACCallback
from lightning_plasticity.callbacks.measurement import MeasurementCallback, MeasurementSkipped
from lightning_plasticity.callbacks.measurements_plot import MeasurementsPlot
from lightning_plasticity.callbacks.parameter_stats import ParameterStatsCallback
from lightning_plasticity.callbacks.plasticity_probe import PlasticityProbeCallback
from lightning_plasticity.callbacks.task_metrics_plot import TaskMetricsPlot
from lightning_plasticity.callbacks.task_progress import TaskProgressBar
from lightning_plasticity.callbacks.unit_activity import UnitActivityCallback
from lightning_plasticity.callbacks.wandb_task_axis import WandbTaskAxis

# From the submodules, not the package: see lightning_plasticity/interventions/__init__.py.
from lightning_plasticity.interventions.continual_backprop import ContinualBackprop
from lightning_plasticity.interventions.redo import ReDo
from lightning_plasticity.interventions.reset_layers import ResetLayers
from lightning_plasticity.interventions.shrink_and_perturb import ShrinkAndPerturb

__all__ = [
    "ContinualBackprop",
    "ReDo",
    "ResetLayers",
    "ShrinkAndPerturb",
    "ENTKCallback",
    "FeatureRankCallback",
    "GradientInterferenceCallback",
    "HessianRankCallback",
    "HistoryWriter",
    "KFACCallback",
    "MeasurementCallback",
    "MeasurementSkipped",
    "MeasurementsPlot",
    "ParameterStatsCallback",
    "PlasticityProbeCallback",
    "TaskMetricsPlot",
    "TaskProgressBar",
    "UnitActivityCallback",
    "WandbTaskAxis",
]
