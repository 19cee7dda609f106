"""ShrinkAndPerturb, and the task/step schedule every intervention shares."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_plasticity.core.initialization import fresh_initialization
from lightning_plasticity.interventions import ShrinkAndPerturb, shrink_perturb
from tests.data.helpers import fast_trainer
from tests.interventions.helpers import Snapshot, assert_same, classifier, fit, stream


def test_shrink_and_perturb_is_exact_and_leaves_the_rng_alone() -> None:
    before, after = Snapshot(task=1), Snapshot(task=1)
    cb = ShrinkAndPerturb(alpha=0.4, sigma=0.1, seed=123)
    fit([before, cb, after])
    assert cb.num_applied == 1  # task 1 only: task 0 starts from a fresh initialisation
    assert before.taken is not None and after.taken is not None
    fresh = dict(fresh_initialization(before.taken["model"], cb.last_seed).named_parameters())
    assert cb.last_seed == cb.seed_for("task_start", 5)
    expected = copy.deepcopy({k: v for k, v in before.taken.items() if k in ("params", "state")})
    for name, value in expected["params"].items():
        expected["params"][name] = shrink_perturb(value, fresh[name.removeprefix("network.")],
                                                  0.4, 0.1)
    assert_same(after.taken, expected)
    assert torch.equal(after.taken["rng"], before.taken["rng"])


def test_continual_shrink_and_perturb_every_step() -> None:
    cb = ShrinkAndPerturb(alpha=0.999, sigma=0.001, on_task_start=False, every_n_train_steps=2,
                          seed=0)
    fit([cb])
    assert cb.num_applied == 5
    state = cb.state_dict()
    other = ShrinkAndPerturb(seed=1)
    other.load_state_dict(state)
    assert other.base_seed == 0 and other.num_applied == 5 and other._steps.last == 10


def test_resuming_inside_a_task_does_not_repeat_its_start(tmp_path: Any) -> None:
    class CountStarts(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[int] = []

        def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                          task_id: int) -> None:
            self.starts.append(task_id)

    pl.seed_everything(0)
    first = ShrinkAndPerturb()
    trainer = fast_trainer(callbacks=[first], limit_val_batches=0, max_steps=7)
    trainer.fit(classifier(), datamodule=stream())
    assert first.num_applied == 1
    trainer.save_checkpoint(tmp_path / "mid_task.ckpt")
    resumed, starts = ShrinkAndPerturb(), CountStarts()
    fast_trainer(callbacks=[resumed, starts], limit_val_batches=0).fit(
        classifier(), datamodule=stream(), ckpt_path=tmp_path / "mid_task.ckpt",
        weights_only=False)  # the hyperparameters hold a functools.partial
    assert resumed.base_seed == first.base_seed
    assert resumed.num_applied == 1, f"task starts seen on resume: {starts.starts}"
