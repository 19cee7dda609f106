"""Interventions on modules written without this package (the zoo and a few more).

Frozen weights stay bit-identical, every optimizer that holds a touched parameter has exactly the
touched state reset, a manual-optimization module without ``plasticity_loss`` gets one warning
instead of a crash, functional activations (``F.relu``) are seen through ``(incoming, outgoing)``
pairs, and ReDo's measurement has no side effects on any batch structure.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_plasticity.data.task_events import dispatch_task_event
from lightning_plasticity.interventions import (
    ContinualBackprop,
    ReDo,
    ResetLayers,
    ShrinkAndPerturb,
)
from tests.zoo.modules import (
    IN_DIM,
    NUM_CLASSES,
    ZOO,
    PlantedDeadUnits,
    ZooEntry,
    fit,
    planted_loader,
)


def classification_entry(name: str, make: Callable[[], pl.LightningModule]) -> ZooEntry:
    return ZooEntry(name, make, ZOO["no_forward"].make_dataloader)


def fit_recording(entry: ZooEntry, callbacks: list[pl.Callback], max_steps: int = 8,
                  **kwargs: Any) -> tuple[pl.Trainer, pl.LightningModule, list[str]]:
    """:func:`fit`, and the messages of every warning an intervention raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, module = fit(entry, callbacks, max_steps=max_steps, **kwargs)
    names = ("ReDo", "ContinualBackprop", "ShrinkAndPerturb", "ResetLayers")
    return trainer, module, [str(w.message) for w in caught
                             if str(w.message).startswith(names)]


def parameters(module: nn.Module) -> dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def optimizer_states(trainer: pl.Trainer, module: nn.Module) -> list[dict[str, dict[str, Tensor]]]:
    """Per optimizer: parameter name -> its state tensors, cloned."""
    names = {p: n for n, p in module.named_parameters()}
    return [{names[p]: {k: v.clone() for k, v in s.items() if isinstance(v, Tensor)}
             for p, s in opt.state.items()} for opt in trainer.optimizers]


class TaskStartAt(pl.Callback):
    """Fires a task-start event for every callback at the end of training step ``step``."""

    def __init__(self, step: int, task_id: int = 1) -> None:
        self.step, self.task_id = step, task_id

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            dispatch_task_event(trainer, pl_module, "on_task_start", self.task_id)


class AtStep(pl.Callback):
    """Calls ``fn(trainer, pl_module)`` at the end of training step ``step`` (once)."""

    def __init__(self, step: int, fn: Callable[[pl.Trainer, pl.LightningModule], Any]) -> None:
        self.step, self.fn, self.done = step, fn, False
        self.result: Any = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.done:
            self.done = True
            self.result = self.fn(trainer, pl_module)


# ------------------------------------------------------------------------------- frozen weights

class DeepMLP(pl.LightningModule):
    """Three hidden ReLU layers; ``net.2`` (the second Linear) is frozen.

    Unit layers: ``net.0 -> net.2`` (frozen outgoing weight: skipped with a warning),
    ``net.2 -> net.4`` (frozen incoming weight: skipped), ``net.4 -> net.6`` (worked on).
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN_DIM, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))
        self.net[2].requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def frozen_values() -> dict[str, Tensor]:
    pl.seed_everything(0, verbose=False)
    return {n: p.detach().clone() for n, p in DeepMLP().net[2].named_parameters()}


def assert_frozen_untouched(module: pl.LightningModule) -> None:
    for name, value in frozen_values().items():
        assert torch.equal(getattr(module.net[2], name), value), name


def test_redo_leaves_frozen_layers_bit_identical() -> None:
    redo = ReDo(tau=1.0, every_n_train_steps=2, on_task_start=False, seed=0)
    _, module, messages = fit_recording(classification_entry("deep", DeepMLP), [redo], 4)
    assert_frozen_untouched(module)
    assert redo.num_applied == 2 and redo.num_reset_total > 0
    assert list(redo.last_units) == ["net.4"] and redo.last_units["net.4"]
    # The recycled units' outgoing columns are zero (the last step's recycling).
    assert module.net[6].weight[:, redo.last_units["net.4"]].abs().sum() == 0
    assert len(messages) == 1 and "'net.2'" in messages[0] and "frozen" in messages[0]


def test_continual_backprop_leaves_frozen_layers_bit_identical() -> None:
    cbp = ContinualBackprop(replacement_rate=0.5, maturity_threshold=1, seed=0)
    _, module, messages = fit_recording(classification_entry("deep", DeepMLP), [cbp], 6)
    assert_frozen_untouched(module)
    assert cbp.num_replaced["net.4"] > 0
    assert cbp.num_replaced["net.0"] == cbp.num_replaced["net.2"] == 0
    assert cbp.ages["net.0"].sum() == cbp.ages["net.2"].sum() == 0  # not even aged
    assert len(messages) == 1 and "'net.2'" in messages[0] and "frozen" in messages[0]


def test_shrink_and_perturb_and_reset_layers_leave_frozen_parameters_alone() -> None:
    sp = ShrinkAndPerturb(alpha=0.5, sigma=0.5, on_task_start=False, every_n_train_steps=2)
    _, module, messages = fit_recording(classification_entry("deep", DeepMLP), [sp], 4)
    assert sp.num_applied == 2 and not messages
    assert_frozen_untouched(module)

    captured: dict[str, Tensor] = {}

    def before(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        captured.update(parameters(pl_module.net[4]))

    reset = ResetLayers(layers=["net.2", "net.4"], seed=0)
    _, module, messages = fit_recording(classification_entry("deep", DeepMLP),
                                        [AtStep(2, before), TaskStartAt(2), reset], 2)
    assert reset.num_applied == 1
    assert_frozen_untouched(module)
    assert not torch.equal(module.net[4].weight, captured["weight"])  # reset
    frozen = [m for m in messages if "frozen" in m]
    assert len(frozen) == 1 and "net.2.weight" in frozen[0] and "net.2.bias" in frozen[0]


# ------------------------------------------------------------------------------- two optimizers

class TwoOptimizers(pl.LightningModule):
    """Manual optimization with two Adams: ``body`` (first) and ``top`` (second)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.body = nn.Sequential(nn.Linear(IN_DIM, 32), nn.ReLU())
        self.top = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))

    def plasticity_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.top(self.body(x)), y)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_body, opt_top = self.optimizers()
        loss = self.plasticity_loss(batch)
        opt_body.zero_grad()
        opt_top.zero_grad()
        self.manual_backward(loss)
        opt_body.step()
        opt_top.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.body.parameters(), lr=1e-2),
                torch.optim.Adam(self.top.parameters(), lr=1e-2)]


TWO_OPTIMIZERS = classification_entry("two_adams", TwoOptimizers)
TWO_LAYERS = [("body.0", "body.1", "top.0"), ("top.0", "top.1", "top.2")]


def kill(units: dict[str, list[int]]) -> Callable[[pl.Trainer, pl.LightningModule], Any]:
    """Makes units dead (zero incoming weights, bias -1), then snapshots optimizer states."""

    def fn(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        with torch.no_grad():
            for name, rows in units.items():
                layer = pl_module.get_submodule(name)
                layer.weight[rows] = 0.0
                layer.bias[rows] = -1.0
        return optimizer_states(trainer, pl_module)

    return fn


def test_redo_resets_the_state_of_recycled_entries_in_every_optimizer() -> None:
    # Each batch makes two optimizer steps: global steps 2, 4, 6.
    killer = AtStep(4, kill({"top.0": [3, 7], "body.0": [1]}))
    redo = ReDo(tau=0.025, every_n_train_steps=4, on_task_start=False, layers=TWO_LAYERS, seed=0)
    after = AtStep(4, lambda trainer, module: optimizer_states(trainer, module))
    fit(TWO_OPTIMIZERS, [killer, redo, after], max_steps=4)
    assert redo.num_applied == 1
    top, body = redo.last_units["top.0"], redo.last_units["body.0"]
    assert {3, 7} <= set(top) and 1 in body
    before, now = killer.result, after.result
    # The killed rows had Adam moments in the second optimizer; now exactly those are zero.
    assert before[1]["top.0.weight"]["exp_avg_sq"][[3, 7]].abs().sum() > 0
    assert before[0]["body.0.weight"]["exp_avg"][[1]].abs().sum() > 0
    zeroed = {  # (optimizer, parameter) -> the (dim, indices) of the entries written
        (0, "body.0.weight"): [(0, body)], (0, "body.0.bias"): [(0, body)],
        (1, "top.0.weight"): [(0, top), (1, body)], (1, "top.0.bias"): [(0, top)],
        (1, "top.2.weight"): [(1, top)]}
    for i, state in enumerate(before):
        assert now[i].keys() == state.keys()
        for name, entries in state.items():
            for key, value in entries.items():
                expected = value.clone()
                for dim, index in zeroed.get((i, name), []) if value.dim() > 0 else []:
                    expected.index_fill_(dim, torch.tensor(index), 0)
                assert torch.equal(now[i][name][key], expected), (i, name, key)
    for key in ("exp_avg", "exp_avg_sq"):
        assert now[1]["top.0.weight"][key][top].abs().sum() == 0
        assert now[1]["top.2.weight"][key][:, top].abs().sum() == 0
        assert now[0]["body.0.weight"][key][body].abs().sum() == 0


@pytest.mark.filterwarnings("ignore:ResetLayers. on_task_start needs a ContinualDataModule")
def test_reset_layers_drops_state_in_the_optimizer_that_holds_the_layer() -> None:
    snap = AtStep(4, lambda trainer, module: optimizer_states(trainer, module))
    reset = ResetLayers(layers=["top.2"], seed=0)
    after = AtStep(4, lambda trainer, module: optimizer_states(trainer, module))
    fit(TWO_OPTIMIZERS, [snap, TaskStartAt(4), reset, after], max_steps=4)
    assert reset.num_applied == 1
    before, now = snap.result, after.result
    assert {"top.2.weight", "top.2.bias"} <= before[1].keys()
    assert now[0].keys() == before[0].keys()
    assert now[1].keys() == before[1].keys() - {"top.2.weight", "top.2.bias"}
    for i, state in enumerate(now):
        for name, entries in state.items():
            for key, value in entries.items():
                assert torch.equal(value, before[i][name][key]), (i, name, key)

    everything = ResetLayers(reset_layers=False, reset_optimizer=True)
    after = AtStep(4, lambda trainer, module: optimizer_states(trainer, module))
    fit(TWO_OPTIMIZERS, [TaskStartAt(4), everything, after], max_steps=4)
    assert after.result == [{}, {}]


def test_shrink_and_perturb_keeps_every_optimizer_state() -> None:
    snap = AtStep(4, lambda trainer, module: optimizer_states(trainer, module))
    sp = ShrinkAndPerturb(on_task_start=False, every_n_train_steps=3, seed=0)
    after = AtStep(4, lambda trainer, module: optimizer_states(trainer, module))
    fit(TWO_OPTIMIZERS, [snap, sp, after], max_steps=8)
    # Global steps 2, 4, 6, 8: the multiples 3 and 6 are crossed at steps 4 and 6.
    assert sp.num_applied == 2 and sp._steps.last == 6
    for i, state in enumerate(snap.result):
        for name, entries in state.items():
            for key, value in entries.items():
                assert torch.equal(after.result[i][name][key], value)


# ------------------------------------------------------------------------ manual optimization

def test_redo_on_manual_optimization_without_plasticity_loss_warns_once_and_changes_nothing(
) -> None:
    entry = ZOO["manual_opt"]
    _, plain = fit(entry, [], max_steps=6)
    redo = ReDo(every_n_train_steps=2, on_task_start=False, tau=1.0)
    _, module, messages = fit_recording(entry, [redo], max_steps=6)
    assert len(messages) == 1, messages
    assert "plasticity_loss" in messages[0] and "loss_fn" in messages[0]
    assert redo.num_applied == 0 and redo.history == []
    for name, value in parameters(plain).items():
        assert torch.equal(module.state_dict()[name], value), name


def test_redo_on_manual_optimization_with_loss_fn_recycles() -> None:
    def loss_fn(pl_module: pl.LightningModule, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(pl_module(x), y)

    redo = ReDo(every_n_train_steps=2, on_task_start=False, tau=1.0, loss_fn=loss_fn, seed=0)
    _, _, messages = fit_recording(ZOO["manual_opt"], [redo], max_steps=4)
    assert not messages and redo.num_applied == 2 and redo.num_reset_total > 0


# ------------------------------------------------------------------------------- functional relu

def test_redo_with_incoming_outgoing_pairs_recycles_exactly_the_planted_dead_units() -> None:
    entry = ZooEntry("planted", lambda: PlantedDeadUnits(dead=16, width=128), planted_loader)
    _, plain = fit(entry, [], max_steps=2)
    redo = ReDo(tau=0.025, every_n_train_steps=2, on_task_start=False, layers=[("fc1", "fc2")],
                seed=0)
    _, module = fit(entry, [redo], max_steps=2)
    assert redo.unit_layers[0].activation is None
    assert redo.last_units == {"fc1": list(range(16))}
    assert redo.history[0]["dormant"] == {"fc1": 16}
    # Recycled: fresh incoming rows, zero outgoing columns; everything else as without ReDo.
    assert module.fc1.weight[:16].abs().sum(dim=1).min() > 0
    assert module.fc2.weight[:, :16].abs().sum() == 0
    assert torch.equal(module.fc1.weight[16:], plain.fc1.weight[16:])
    assert torch.equal(module.fc1.bias[16:], plain.fc1.bias[16:])
    assert torch.equal(module.fc2.weight[:, 16:], plain.fc2.weight[:, 16:])
    assert torch.equal(module.fc2.bias, plain.fc2.bias)


def test_continual_backprop_reads_functional_units_from_the_outgoing_input() -> None:
    entry = ZooEntry("planted", lambda: PlantedDeadUnits(dead=16, width=128), planted_loader)
    cbp = ContinualBackprop(maturity_threshold=100, layers=[("fc1", "fc2")], seed=0)
    fit(entry, [cbp], max_steps=3)
    utility = cbp.utility["fc1"]
    assert cbp.ages["fc1"].tolist() == [3] * 128
    assert utility[:16].abs().sum() == 0 and utility[16:].min() > 0


# ------------------------------------------------------------------------------- any batch

@pytest.mark.parametrize("name", ["dict_batch", "counter_buffer", "batchnorm"])
def test_redo_measures_any_batch_without_side_effects(name: str) -> None:
    """``tau = 0``: no unit of these nets is dead, so training must be exactly as without ReDo
    (the measurement runs the user's training_step: counters, EMA teachers, BatchNorm
    statistics and the RNG must all be restored)."""
    entry = ZOO[name]
    _, plain = fit(entry, [], max_steps=6)
    redo = ReDo(tau=0.0, every_n_train_steps=2, on_task_start=False, seed=0)
    _, module, messages = fit_recording(entry, [redo], max_steps=6)
    assert not messages and redo.num_applied == 3
    assert all(count == 0 for h in redo.history for count in h["dormant"].values())
    for key, value in parameters(plain).items():
        assert torch.equal(module.state_dict()[key], value), key
