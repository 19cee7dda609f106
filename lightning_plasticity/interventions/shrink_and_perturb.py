"""``ShrinkAndPerturb``: ``theta <- alpha * theta + sigma * theta_fresh`` at tasks or steps."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn.utils import parametrize
from typing_extensions import override

from lightning_plasticity.core.initialization import fresh_initialization
from lightning_plasticity.interventions.schedule import ScheduledIntervention

__all__ = ["ShrinkAndPerturb", "shrink_perturb"]


def shrink_perturb(theta: torch.Tensor, fresh: torch.Tensor, alpha: float,
                   sigma: float) -> torch.Tensor:
    """``alpha * theta + sigma * fresh`` (the exact expression :class:`ShrinkAndPerturb` uses)."""
    return alpha * theta + sigma * fresh


class ShrinkAndPerturb(ScheduledIntervention):
    """Shrink the weights towards zero and perturb them with a fresh initialisation.

    ``theta <- alpha * theta + sigma * theta_fresh`` for every trainable parameter, where
    ``theta_fresh`` is a new draw of the network's own initialisation: a deep copy of the network
    with ``reset_parameters()`` called on every submodule that has it (see
    :func:`~lightning_plasticity.core.initialization.fresh_initialization`), drawn from
    :meth:`seed_for` so that the global RNG streams are not consumed. Ash and Adams (NeurIPS
    2020, "On warm-starting neural network training") apply it whenever new data arrive, i.e. at
    task starts, with ``alpha = 0.4`` and noise scale ``sigma = 0.1``: it keeps most of what was
    learned while restoring the gradient magnitudes of a fresh network. Applied every step with
    ``alpha`` close to 1 and a small ``sigma`` it is the continual variant Dohare et al. (Nature
    2024) compare with (they perturb with Gaussian noise instead of a fresh initialisation).

    Parameters of modules without ``reset_parameters`` (e.g. a ViT's class token) are left
    unchanged (said once in a warning); frozen parameters (``requires_grad=False``), buffers
    and the optimizer state are not touched. Parametrized layers (``spectral_norm``) are
    refused: their weight is computed from other tensors.

    Args:
        alpha: shrink factor in ``[0, 1]``.
        sigma: perturbation scale, ``>= 0``.
        module: the submodule to act on, by name; default: ``pl_module.network`` if the module
            has one (the package's modules do), else the whole LightningModule.
        on_task_start: apply at the start of every ``every_n_tasks``-th task after the first.
        every_n_train_steps: also apply after every this many optimizer steps.
        every_n_tasks: task frequency.
        seed: base seed of the fresh initialisations (default: rank 0's torch seed at fit
            start); :attr:`last_seed` is the seed of the latest one.

    Example:
        Ash and Adams' choice is ``ShrinkAndPerturb(alpha=0.4, sigma=0.1)`` at every task start
        (with a ContinualDataModule); the continual variant acts every few steps:

        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> sp = ShrinkAndPerturb(alpha=0.9, sigma=0.01, on_task_start=False,
        ...                       every_n_train_steps=2, seed=0)
        >>> trainer = pl.Trainer(max_steps=4, callbacks=[sp], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(BoringModel())
        >>> sp.num_applied, sp.last_seed == sp.seed_for("step", 4)
        (2, True)
    """

    seed_key = "shrink_and_perturb"

    def __init__(self, alpha: float = 0.4, sigma: float = 0.1, module: str | None = None,
                 on_task_start: bool = True, every_n_train_steps: int | None = None,
                 every_n_tasks: int = 1, seed: int | None = None) -> None:
        super().__init__(on_task_start=on_task_start, every_n_train_steps=every_n_train_steps,
                         every_n_tasks=every_n_tasks, seed=seed)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"ShrinkAndPerturb: alpha (the shrink factor) must be in [0, 1], "
                             f"got {alpha}; 0.4 is Ash and Adams' choice, 1 means no shrinking.")
        if not sigma >= 0.0:
            raise ValueError(f"ShrinkAndPerturb: sigma (the perturbation scale) must be >= 0, "
                             f"got {sigma}; 0.1 is Ash and Adams' choice.")
        self.alpha, self.sigma, self.module = float(alpha), float(sigma), module

    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "alpha": self.alpha, "sigma": self.sigma}

    def target(self, pl_module: pl.LightningModule) -> nn.Module:
        """The module whose parameters are shrunk and perturbed."""
        if self.module is not None:
            modules = dict(pl_module.named_modules())
            if self.module not in modules:
                names = [n for n in modules if n][:20]
                raise ValueError(f"ShrinkAndPerturb: no submodule named {self.module!r}; "
                                 f"available: {names}.")
            return modules[self.module]
        network = getattr(pl_module, "network", None)
        return network if isinstance(network, nn.Module) else pl_module

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        target = self.target(pl_module)
        bad = [n for n, m in target.named_modules() if parametrize.is_parametrized(m)]
        if bad:
            raise ValueError(f"ShrinkAndPerturb: parametrized layers {bad} (e.g. spectral_norm) "
                             "are not supported; choose another module= or drop the "
                             "parametrization.")
        uncovered = self._uncovered(target)
        if uncovered:
            self._warn_once(f"parameters {uncovered} belong to no module with "
                            "reset_parameters(), so they are left unchanged")

    @staticmethod
    def _uncovered(target: nn.Module) -> list[str]:
        covered: set[int] = set()
        for m in target.modules():
            if callable(getattr(m, "reset_parameters", None)):
                covered.update(id(p) for p in m.parameters())
        return [n for n, p in target.named_parameters()
                if p.requires_grad and id(p) not in covered]

    @override
    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: str,
              batch: Any) -> None:
        target = self.target(pl_module)
        seed = self.seed_for(event, trainer.global_step)
        fresh = dict(fresh_initialization(target, seed).named_parameters())
        skip = set(self._uncovered(target))
        with torch.no_grad():
            for name, p in target.named_parameters():
                if p.requires_grad and name not in skip:
                    p.copy_(shrink_perturb(p, fresh[name], self.alpha, self.sigma))
        self.last_seed = seed

