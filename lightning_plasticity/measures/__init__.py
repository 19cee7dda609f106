"""Pure-function plasticity measurements (no Lightning import).

Each function takes a model, a loss and/or a batch and returns tensors; the callbacks in
:mod:`lightning_plasticity.callbacks` are thin shells around them.
"""

from lightning_plasticity.measures.entk import EmpiricalNTK, entk
from lightning_plasticity.measures.feature_rank import FeatureRank, srank
from lightning_plasticity.measures.feature_rank import feature_rank as feature_rank_of
from lightning_plasticity.measures.grad_hessian_overlap import (
    GradientHessianAlignment,
    GradientHessianOverlap,
    GradientTopKFraction,
    gradient_hessian_alignment,
    gradient_hessian_overlap,
    gradient_topk_fraction,
)
from lightning_plasticity.measures.gradient_interference import (
    GradientInterference,
    gradient_interference,
)
from lightning_plasticity.measures.hessian_spectrum import (
    EpsRank,
    HessianEigenpairs,
    SpectralDensity,
    eps_rank_of_matrix,
    hessian_eigenvalues,
    hessian_eps_rank,
    spectral_density,
)
from lightning_plasticity.measures.hvp import HessianVectorProduct
from lightning_plasticity.measures.kfac import (
    KFACEpsRank,
    KFACFactors,
    KFACSpectrum,
    kfac_eps_rank,
    kfac_factors,
    kfac_spectrum,
)
from lightning_plasticity.measures.linear_operator import (
    CallableOperator,
    LinearOperator,
    MatrixOperator,
    ProjectedOperator,
)
from lightning_plasticity.measures.parameter_selection import select_parameters
from lightning_plasticity.measures.parameter_stats import (
    ParameterStats,
    parameter_stats,
    snapshot_parameters,
)
from lightning_plasticity.measures.plasticity_probe import PlasticityProbe, plasticity_probe
from lightning_plasticity.measures.spectral_stats import condition_number, effective_rank, eps_count
from lightning_plasticity.measures.unit_activity import UnitActivity
from lightning_plasticity.measures.unit_activity import unit_activity as unit_activity_of

__all__ = [
    "FeatureRank",
    "GradientInterference",
    "ParameterStats",
    "PlasticityProbe",
    "UnitActivity",
    "feature_rank_of",
    "gradient_interference",
    "parameter_stats",
    "plasticity_probe",
    "snapshot_parameters",
    "srank",
    "unit_activity_of",
    "GradientHessianAlignment",
    "GradientHessianOverlap",
    "GradientTopKFraction",
    "gradient_hessian_alignment",
    "gradient_hessian_overlap",
    "gradient_topk_fraction",
    "EmpiricalNTK",
    "EpsRank",
    "HessianEigenpairs",
    "HessianVectorProduct",
    "CallableOperator",
    "LinearOperator",
    "MatrixOperator",
    "ProjectedOperator",
    "SpectralDensity",
    "eps_rank_of_matrix",
    "hessian_eigenvalues",
    "hessian_eps_rank",
    "select_parameters",
    "spectral_density",
    "KFACEpsRank",
    "KFACFactors",
    "KFACSpectrum",
    "condition_number",
    "effective_rank",
    "entk",
    "eps_count",
    "kfac_eps_rank",
    "kfac_factors",
    "kfac_spectrum",
]
