"""Every measurement callback on every module of the zoo (modules written without the package).

Each callback either logs its metrics or skips with a clear message where the module truly
cannot provide what it needs, and the final weights are bit-identical with and without the
callbacks (manual optimization included). The matrix is printed by
``python -m tests.callbacks.test_zoo_matrix``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lightning_plasticity.callbacks import (
    ENTKCallback,
    FeatureRankCallback,
    GradientInterferenceCallback,
    HessianRankCallback,
    KFACCallback,
    MeasurementCallback,
    ParameterStatsCallback,
    PlasticityProbeCallback,
    UnitActivityCallback,
)
from tests.zoo.modules import ZOO, fit

MAX_STEPS = 4

CALLBACKS: dict[str, Callable[[], MeasurementCallback]] = {
    # The last layer: the whole model (the default) of a ResNet-18 takes minutes on a CPU.
    "HessianRankCallback": lambda: HessianRankCallback(probe_size=8, top_k=5,
                                                       last_n_layers=1, max_overhead=None),
    "KFACCallback": lambda: KFACCallback(probe_size=8),
    "ENTKCallback": lambda: ENTKCallback(probe_size=4),
    "UnitActivityCallback": lambda: UnitActivityCallback(probe_size=16),
    "FeatureRankCallback": lambda: FeatureRankCallback(probe_size=16),
    "ParameterStatsCallback": lambda: ParameterStatsCallback(),
    "GradientInterferenceCallback": lambda: GradientInterferenceCallback(probe_size=4),
    "PlasticityProbeCallback": lambda: PlasticityProbeCallback(probe_size=8, steps=3),
}

_NEEDS_LOSS = [name for name in CALLBACKS if name != "ParameterStatsCallback"]
#: (module, callback) -> a fragment of the skip message. Manual optimization: training_step
#: steps the optimizers, so no measurement may run it, and these modules define no
#: plasticity_loss.
EXPECTED_SKIPS: dict[tuple[str, str], str] = {
    **{("manual_opt", cb): "manual optimization" for cb in _NEEDS_LOSS},
    **{("two_optimizers", cb): "manual optimization" for cb in _NEEDS_LOSS},
}


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def run_matrix_row(name: str) -> tuple[dict[str, str], list[str]]:
    """Fit ``name`` with every callback; return callback -> outcome and the weight mismatches."""
    entry = ZOO[name]
    _, plain = fit(entry, max_steps=MAX_STEPS)
    callbacks: list[Callback] = [make() for make in CALLBACKS.values()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, measured = fit(entry, callbacks=callbacks, max_steps=MAX_STEPS)
    outcome = {}
    for cb_name, cb in zip(CALLBACKS, callbacks, strict=True):
        skips = [str(w.message) for w in caught
                 if str(w.message).startswith(f"{cb_name}: skipped")]
        outcome[cb_name] = "works" if cb.history and not skips else (
            skips[0] if skips else "nothing measured, no warning")
    before, after = _weights(plain), _weights(measured)
    mismatches = [k for k in before if not torch.equal(before[k], after[k])]
    return outcome, mismatches


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_callback_on_every_module(name: str) -> None:
    outcome, mismatches = run_matrix_row(name)
    assert mismatches == [], f"training changed by the measurements: {mismatches}"
    for cb_name, result in outcome.items():
        expected = EXPECTED_SKIPS.get((name, cb_name))
        if expected is None:
            assert result == "works", f"{cb_name} on {name}: {result}"
        else:
            assert expected in result, f"{cb_name} on {name}: {result}"


if __name__ == "__main__":  # the module x callback matrix for the docs
    print("| module | " + " | ".join(CALLBACKS) + " |")
    print("|---" * (len(CALLBACKS) + 1) + "|")
    for zoo_name in sorted(ZOO):
        row, _ = run_matrix_row(zoo_name)
        cells = ["works" if r == "works" else "skips: " + r.split("(", 1)[-1][:60]
                 for r in row.values()]
        print(f"| {zoo_name} | " + " | ".join(cells) + " |")


def test_manual_optimization_measures_with_a_loss_fn_and_never_steps() -> None:
    # With loss_fn the measurements run on a manual-optimization module; its training_step
    # (which steps Adam) is never called by them: Adam's step count and the weights are those
    # of a run without callbacks.
    def loss_fn(module: torch.nn.Module, batch: Any) -> torch.Tensor:
        return F.cross_entropy(module(batch[0]), batch[1])

    entry = ZOO["manual_opt"]
    trainer_plain, plain = fit(entry, max_steps=MAX_STEPS)
    callbacks = [KFACCallback(probe_size=8, loss_fn=loss_fn),
                 UnitActivityCallback(probe_size=16, loss_fn=loss_fn),
                 HessianRankCallback(probe_size=8, loss_fn=loss_fn, max_overhead=None)]
    trainer, measured = fit(entry, callbacks=callbacks, max_steps=MAX_STEPS)
    assert all(len(cb.history) == 2 for cb in callbacks)
    step_count = [s["step"] for s in trainer.optimizers[0].state_dict()["state"].values()]
    plain_count = [s["step"] for s in trainer_plain.optimizers[0].state_dict()["state"].values()]
    assert [float(s) for s in step_count] == [float(s) for s in plain_count] == [MAX_STEPS] * 4
    assert all(torch.equal(a, b) for a, b in zip(_weights(plain).values(),
                                                 _weights(measured).values(), strict=True))
