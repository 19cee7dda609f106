"""``ShrinkAndPerturb``: ``theta <- alpha * theta + sigma * theta_fresh`` at task starts or steps.

Also home of the small base classes every intervention callback shares (seeding that leaves the
global RNG streams alone and agrees across ranks, the task/step schedule, resume guards, logging).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.utils import parametrize
from typing_extensions import override

from lightning_plasticity.data.seeding import derive_seed
from lightning_plasticity.measures.unit_utility import fresh_initialization

#: Metrics of the interventions are logged as ``f"{INTERVENTION_PREFIX}/{name}"``.
INTERVENTION_PREFIX = "intervention"


class SeededIntervention(Callback):
    """Base of the intervention callbacks: reproducible seeds, logging, one-time notices.

    Every random draw of an intervention comes from :meth:`seed_for`, a hash of a base seed and
    of where it happens (event, step, layer), never from the global RNG streams, so adding an
    intervention does not change the data order or dropout masks of a run, and a resumed run
    draws the same values. The base seed is ``seed``, else the torch seed of rank 0 at fit start
    (set by ``seed_everything``), broadcast so that every rank modifies its replica identically.

    Args:
        seed: The base seed, or ``None``.
    """

    #: names this intervention's draws in :meth:`seed_for`
    seed_key = "intervention"

    def __init__(self, *, seed: int | None = None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{type(self).__name__}: seed must be an int or None, got {seed!r}.")
        self.seed = seed
        #: the resolved base seed (set at fit start)
        self.base_seed: int | None = seed
        self._warned: set[str] = set()

    def seed_for(self, *keys: int | str) -> int:
        """The seed of one draw: a hash of the base seed, :attr:`seed_key` and ``keys``."""
        if self.base_seed is None:
            raise RuntimeError(f"{type(self).__name__}: the base seed is set at fit start; "
                               "pass seed= to use seed_for before that.")
        return derive_seed(self.base_seed, self.seed_key, *keys)

    def _resolve_seed(self, trainer: pl.Trainer) -> None:
        if self.base_seed is None:
            local = torch.initial_seed() & (2**63 - 1)
            self.base_seed = int(trainer.strategy.broadcast(local, src=0))

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"{type(self).__name__}: {message}.", stacklevel=3)

    @staticmethod
    def log_now(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Log straight to the loggers at the current step (as LearningRateMonitor does)."""
        metrics = {f"{INTERVENTION_PREFIX}/{k}": float(v) for k, v in metrics.items()}
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve_seed(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"base_seed": self.base_seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("base_seed") is not None:
            self.base_seed = int(state_dict["base_seed"])


class ScheduledIntervention(SeededIntervention):
    """Base of interventions applied at task starts and/or every ``n`` optimizer steps.

    Subclasses implement :meth:`apply`. Task ``0`` is never intervened on (it starts from a
    fresh initialisation), nor is a task twice (a run resumed inside a task whose start was
    already handled does not repeat it).

    Args:
        on_task_start: apply at the start of every ``every_n_tasks``-th task after the first.
        every_n_train_steps: also apply after every this many optimizer steps.
        every_n_tasks: task frequency.
        seed: see :class:`SeededIntervention`.
    """

    def __init__(self, *, on_task_start: bool = True, every_n_train_steps: int | None = None,
                 every_n_tasks: int = 1, seed: int | None = None) -> None:
        super().__init__(seed=seed)
        name = type(self).__name__
        if every_n_train_steps is not None and (isinstance(every_n_train_steps, bool)
                                                or every_n_train_steps < 1):
            raise ValueError(f"{name}: every_n_train_steps must be >= 1 or None, got "
                             f"{every_n_train_steps!r}.")
        if every_n_tasks < 1:
            raise ValueError(f"{name}: every_n_tasks must be >= 1, got {every_n_tasks}.")
        if not on_task_start and every_n_train_steps is None:
            raise ValueError(f"{name} would never act: set on_task_start=True or "
                             "every_n_train_steps.")
        self.at_task_start = on_task_start
        self.every_n_train_steps, self.every_n_tasks = every_n_train_steps, every_n_tasks
        #: how many times the intervention was applied
        self.num_applied = 0
        #: the seed of the latest application
        self.last_seed: int | None = None
        self._last_task = 0
        self._last_step = -1
        self._restored = False

    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: str,
              batch: Any) -> None:
        """Intervene; ``event`` is ``"task_start"`` or ``"step"`` (with the current batch)."""
        raise NotImplementedError

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._state_key_args())

    def _state_key_args(self) -> dict[str, Any]:
        return {"every_n_train_steps": self.every_n_train_steps,
                "every_n_tasks": self.every_n_tasks}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if not self._restored:  # a new run (not a resume): its tasks and steps start over
            self._last_task, self._last_step = 0, -1
        self._restored = False
        if self.every_n_train_steps is None and not hasattr(trainer.datamodule, "task_id"):
            self._warn_once("on_task_start needs a ContinualDataModule (or another source of "
                            "task events); without one nothing happens. Set "
                            "every_n_train_steps to act on steps")

    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                      task_id: int) -> None:
        """Task event (see :mod:`lightning_plasticity.data.task_events`)."""
        if self.at_task_start and task_id > self._last_task and task_id % self.every_n_tasks == 0:
            self._last_task = task_id
            self.apply(trainer, pl_module, "task_start", None)
            self.num_applied += 1

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        n, step = self.every_n_train_steps, trainer.global_step
        # _last_step: with gradient accumulation several batches share one global step.
        if n is not None and step > 0 and step % n == 0 and step != self._last_step:
            self._last_step = step
            self.apply(trainer, pl_module, "step", batch)
            self.num_applied += 1

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "num_applied": self.num_applied,
                "last_task": self._last_task, "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_applied = int(state_dict.get("num_applied", 0))
        self._last_task = int(state_dict.get("last_task", 0))
        self._last_step = int(state_dict.get("last_step", -1))
        self._restored = True


def shrink_perturb(theta: torch.Tensor, fresh: torch.Tensor, alpha: float,
                   sigma: float) -> torch.Tensor:
    """``alpha * theta + sigma * fresh`` (the exact expression :class:`ShrinkAndPerturb` uses)."""
    return alpha * theta + sigma * fresh


class ShrinkAndPerturb(ScheduledIntervention):
    """Shrink the weights towards zero and perturb them with a fresh initialisation.

    ``theta <- alpha * theta + sigma * theta_fresh`` for every trainable parameter, where
    ``theta_fresh`` is a new draw of the network's own initialisation: a deep copy of the network
    with ``reset_parameters()`` called on every submodule that has it (see
    :func:`~lightning_plasticity.measures.unit_utility.fresh_initialization`), drawn from
    :meth:`seed_for` so that the global RNG streams are not consumed. Ash and Adams (NeurIPS
    2020, "On warm-starting neural network training") apply it whenever new data arrive, i.e. at
    task starts, with ``alpha = 0.4`` and noise scale ``sigma = 0.1``: it keeps most of what was
    learned while restoring the gradient magnitudes of a fresh network. Applied every step with
    ``alpha`` close to 1 and a small ``sigma`` it is the continual variant Dohare et al. (Nature
    2024) compare with (they perturb with Gaussian noise instead of a fresh initialisation).

    Parameters of modules without ``reset_parameters`` (e.g. a ViT's class token) are left
    unchanged (said once in a warning); frozen parameters, buffers and the optimizer state are
    not touched. Parametrized layers (``spectral_norm``) are refused: their weight is computed
    from other tensors.

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

    Example::

        trainer = Trainer(callbacks=[ShrinkAndPerturb(alpha=0.4, sigma=0.1)])
        trainer.fit(model, datamodule=ContinualDataModule("digits", "permuted_labels"))
        # continual variant: a gentle shrink and perturb after every step
        ShrinkAndPerturb(alpha=0.9999, sigma=1e-4, on_task_start=False, every_n_train_steps=1)
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


__all__ = ["ScheduledIntervention", "SeededIntervention", "ShrinkAndPerturb", "shrink_perturb"]
