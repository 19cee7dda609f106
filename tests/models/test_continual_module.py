"""ContinualClassifier / ContinualRegressor with every reference network and optimizer."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from lightning_plasticity.data import ContinualDataModule
from lightning_plasticity.models import (
    CNN,
    MLP,
    ContinualClassifier,
    ContinualRegressor,
    ResNet18,
    ViT,
)
from tests.data.helpers import fast_trainer

NETWORKS = {
    "mlp": partial(MLP, width=16, norm="layer"),
    "cnn": partial(CNN, channels=(4, 8), hidden=16, norm="batch"),
    "resnet18": partial(ResNet18, width=4, norm="layer"),
    "vit": partial(ViT, patch_size=4, dim=16, depth=1, heads=2),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_networks_train_on_a_stream(name: str) -> None:
    dm = ContinualDataModule("digits", "permuted_labels", num_tasks=2, steps_per_task=3,
                             batch_size=8)
    model = ContinualClassifier(network=NETWORKS[name])
    fast_trainer(limit_val_batches=1).fit(model, datamodule=dm)
    assert model.hparams.input_shape == (1, 8, 8) and model.hparams.num_outputs == 10
    assert len(dm.task_history) == 2


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "rmsprop"])
def test_optimizer_choice(optimizer: str) -> None:
    model = ContinualClassifier(input_shape=(4,), num_outputs=3, optimizer=optimizer,
                                betas=(0.9, 0.9), eps=1e-3, momentum=0.5)
    opt = model.configure_optimizers()
    assert type(opt).__name__.lower() == optimizer
    if optimizer == "adam":
        assert opt.defaults["betas"] == (0.9, 0.9) and opt.defaults["eps"] == 1e-3


def test_bad_optimizer_arguments() -> None:
    with pytest.raises(ValueError, match="Unknown optimizer 'lion'"):
        ContinualClassifier(optimizer="lion")
    with pytest.raises(ValueError, match="betas must be in"):
        ContinualClassifier(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr > 0"):
        ContinualClassifier(lr=0.0)


def test_regressor_on_slowly_changing_regression() -> None:
    dm = ContinualDataModule("regression_teacher", "slowly_changing_regression", num_tasks=2,
                             steps_per_task=20, batch_size=16)
    model = ContinualRegressor(optimizer="sgd", lr=0.01)
    trainer = fast_trainer(limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    assert "task/end_loss" in trainer.callback_metrics
    assert "task/end_accuracy" not in trainer.callback_metrics


def test_checkpoint_rebuilds_the_network(tmp_path) -> None:  # noqa: ANN001
    dm = ContinualDataModule("digits", num_tasks=1, steps_per_task=2)
    model = ContinualClassifier(network=partial(MLP, width=8))
    trainer = fast_trainer(limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    # The factory is pickled in hparams (LightningCLI runs store their YAML instead).
    loaded = ContinualClassifier.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=False)
    for a, b in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_module_without_data_module_needs_shapes() -> None:
    with pytest.raises(RuntimeError, match="pass input_shape and num_outputs"):
        ContinualClassifier()(torch.zeros(1, 4))
