"""Interventions against loss of plasticity, as Lightning callbacks, and their building blocks.

* :class:`ReDo` (Sokar et al., 2023): recycle dormant units every N steps and/or at task starts.
* :class:`ContinualBackprop` (Dohare et al., 2024): replace a small fraction of low-utility
  mature units every step.
* :class:`ShrinkAndPerturb` (Ash and Adams, 2020): ``theta <- alpha * theta + sigma *
  theta_fresh``.
* :class:`ResetLayers` (Lyle et al., 2023; Nikishin et al., 2022): reinitialise layers and/or
  forget the optimizer state at task starts.

Every intervention writes only trainable parameters (``requires_grad=True``), resets the
optimizer state of exactly what it wrote in every optimizer of ``trainer.optimizers``, draws its
random values from its own seeds (the global RNG streams are untouched) and measures, where it
needs to, without side effects. Building blocks: :mod:`.schedule` (seeding, task/step schedule),
:mod:`.surgery` (unit layers, unit activity, reinitialising units), :mod:`.optimizer_state`.
"""

# callbacks.probe first: importing it runs lightning_plasticity.callbacks' __init__, which imports
# the intervention submodules (for the short names in YAML), before any of them runs here.
import lightning_plasticity.callbacks.probe  # noqa: F401
from lightning_plasticity.interventions.continual_backprop import (
    ContinualBackprop,
    bias_corrected,
    contribution_utility,
    ema_update,
    lowest_utility_units,
    replacement_count,
)
from lightning_plasticity.interventions.optimizer_state import (
    drop_state,
    reset_parameter_state,
    reset_state_entries,
    reset_touched,
)
from lightning_plasticity.interventions.redo import ReDo, dormant_scores, dormant_units
from lightning_plasticity.interventions.reset_layers import (
    ResetLayers,
    copy_trainable,
    default_last_layer,
)
from lightning_plasticity.interventions.schedule import (
    INTERVENTION_PREFIX,
    ScheduledIntervention,
    SeededIntervention,
)
from lightning_plasticity.interventions.shrink_and_perturb import ShrinkAndPerturb, shrink_perturb
from lightning_plasticity.interventions.surgery import (
    ParamEntries,
    UnitLayer,
    find_unit_layers,
    reinitialize_incoming,
    reinitialize_units,
    unit_activity,
    zero_outgoing,
)

__all__ = [
    "INTERVENTION_PREFIX",
    "ContinualBackprop",
    "ParamEntries",
    "ReDo",
    "ResetLayers",
    "ScheduledIntervention",
    "SeededIntervention",
    "ShrinkAndPerturb",
    "UnitLayer",
    "bias_corrected",
    "contribution_utility",
    "copy_trainable",
    "default_last_layer",
    "dormant_scores",
    "dormant_units",
    "drop_state",
    "ema_update",
    "find_unit_layers",
    "lowest_utility_units",
    "reinitialize_incoming",
    "reinitialize_units",
    "replacement_count",
    "reset_parameter_state",
    "reset_state_entries",
    "reset_touched",
    "shrink_perturb",
    "unit_activity",
    "zero_outgoing",
]
