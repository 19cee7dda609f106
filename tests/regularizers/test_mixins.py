"""The regularizer mixins: composition, hparams, logged penalties, resume, CLI and bad input."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from lightning_plasticity.cli import run_cli
from lightning_plasticity.data import ContinualDataModule
from lightning_plasticity.models import MLP, ContinualClassifier
from lightning_plasticity.regularizers.mixins import (
    INIT_ANCHOR_KEY,
    L2ERRegularizer,
    L2InitRegularizer,
    L2InitWassersteinClassifier,
    L2Regularizer,
    WassersteinInitRegularizer,
)
from lightning_plasticity.regularizers.penalties import (
    effective_rank_penalty,
    l2_init_penalty,
    l2_penalty,
    wasserstein_init_penalty,
)
from tests.conftest import REPO
from tests.data.helpers import fast_trainer


class ForeignNet(pl.LightningModule):
    """A LightningModule written without this package: a loss tensor from training_step."""

    def __init__(self, in_features: int = 64, hidden: int = 16, num_classes: int = 10,
                 lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class RegularizedForeignNet(L2ERRegularizer, WassersteinInitRegularizer, ForeignNet):
    """Two mixins on the foreign module (named by class path in the CLI test's YAML)."""


class PlainNet(pl.LightningModule):
    """No save_hyperparameters and a training_step without batch_idx."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def training_step(self, batch: Any) -> Tensor:
        return F.cross_entropy(self.layer(batch[0]), batch[1])


class RegularizedPlainNet(L2Regularizer, L2InitRegularizer, PlainNet):
    pass


def perturb_(module: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def batch(n: int, d: int, classes: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randint(classes, (n,), generator=g))


def test_composed_step_adds_each_penalty_to_the_module_loss() -> None:
    torch.manual_seed(0)
    model = L2InitWassersteinClassifier(network=partial(MLP, width=5), input_shape=(4,),
                                        num_outputs=3, l2_init_coef=0.5,
                                        wasserstein_coef=2.0).double()
    x, y = batch(8, 4, 3)
    first = model.training_step((x, y), 0)  # captures theta_0: both penalties are 0
    torch.testing.assert_close(first["loss"],
                               ContinualClassifier.training_step(model, (x, y), 0)["loss"])
    theta0 = [p.detach().clone() for p in model.parameters()]
    perturb_(model)
    out = model.training_step((x, y), 0)
    params = list(model.parameters())
    plain = ContinualClassifier.training_step(model, (x, y), 0)
    expected = (plain["loss"] + 0.5 * l2_init_penalty(params, theta0)
                + 2.0 * wasserstein_init_penalty(params, theta0))
    torch.testing.assert_close(out["loss"], expected, rtol=1e-12, atol=0)
    assert torch.equal(out["logits"], plain["logits"])  # the module's other outputs are kept
    got = torch.autograd.grad(out["loss"], params)
    want = torch.autograd.grad(expected, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_l2er_uses_the_layer_inputs_of_the_same_forward() -> None:
    torch.manual_seed(0)
    model = RegularizedForeignNet(in_features=4, hidden=6, num_classes=3, l2er_coef=0.2,
                                  l2er_l2_coef=0.1, wasserstein_coef=0.0).double()
    x, y = batch(9, 4, 3)
    perturb_(model)
    loss = model.training_step((x, y), 0)
    hidden = model.body(x)  # the input of `out`; the data entering body's Linear is skipped
    expected = (ForeignNet.training_step(model, (x, y), 0)
                + 0.2 * (effective_rank_penalty([hidden]) + 0.1 * l2_penalty(model.parameters())))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    # nothing is collected outside training_step: no hook stays on any layer
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_coefficients_land_in_hparams() -> None:
    model = L2InitWassersteinClassifier(l2_init_coef=0.25, wasserstein_coef=0.5,
                                        l2_init_half=True, lr=0.01)
    assert model.hparams.l2_init_coef == 0.25 and model.hparams.wasserstein_coef == 0.5
    assert model.hparams.l2_init_half is True and model.hparams.lr == 0.01
    # A module that never calls save_hyperparameters still records the regularization.
    plain = RegularizedPlainNet(l2_coef=0.1, l2_init_coef=0.2)
    assert dict(plain.hparams) == {"l2_coef": 0.1, "l2_init_coef": 0.2,
                                   "l2_init_squared": True, "l2_init_half": False}


def test_training_step_without_batch_idx_and_unsquared_half_variant() -> None:
    torch.manual_seed(0)
    model = RegularizedPlainNet(l2_coef=0.1, l2_init_coef=0.3, l2_init_squared=False,
                                l2_init_half=True).double()
    x, y = batch(5, 3, 2)
    model.training_step((x, y), 0)  # Lightning passes batch_idx; PlainNet does not take it
    theta0 = [p.detach().clone() for p in model.parameters()]
    perturb_(model)
    params = list(model.parameters())
    expected = (PlainNet.training_step(model, (x, y)) + 0.1 * l2_penalty(params)
                + 0.3 * l2_init_penalty(params, theta0, squared=False, half=True))
    torch.testing.assert_close(model.training_step((x, y), 0), expected, rtol=1e-12, atol=0)


class AnchorRecorder(pl.Callback):
    """Weights at the start of fit, and the penalties and anchor at the first training batch."""

    def __init__(self) -> None:
        self.start: list[Tensor] = []
        self.first: dict[str, Any] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        if not self.first:
            self.first = {"l2_init": pl_module.l2_init_distance().item(),
                          "wasserstein": pl_module.wasserstein_init_distance().item(),
                          "anchor": [a.clone() for a in pl_module._init_anchor.values()],
                          "params": [p.detach().clone() for p in pl_module.parameters()]}


def checkpointer(dirpath: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=dirpath, every_n_train_steps=2, save_top_k=-1)


def test_resume_regularizes_towards_the_original_init(tmp_path: Path) -> None:
    def model() -> L2InitWassersteinClassifier:
        # The default network, built lazily in configure_model; no pickled factory in hparams,
        # so the checkpoint loads with weights_only=True (the anchor is a dict of tensors).
        return L2InitWassersteinClassifier(lr=0.05, l2_init_coef=1e-2, wasserstein_coef=1.0)

    def data() -> ContinualDataModule:
        return ContinualDataModule("digits", num_tasks=1, steps_per_task=3, batch_size=16)

    torch.manual_seed(0)
    first, first_rec = model(), AnchorRecorder()
    trainer = fast_trainer(max_steps=2, callbacks=[first_rec, checkpointer(tmp_path / "first")],
                           enable_checkpointing=True)
    trainer.fit(first, datamodule=data())
    path = next((tmp_path / "first").glob("*.ckpt"))  # written mid-task, at step 2
    theta0 = first_rec.start
    for a, b in zip(first._init_anchor.values(), theta0):
        assert torch.equal(a, b)
    assert {"reg/l2_init", "reg/wasserstein_init"} <= set(trainer.callback_metrics)
    assert trainer.callback_metrics["reg/l2_init"] > 0  # logged at step 2, after one update
    assert INIT_ANCHOR_KEY in torch.load(path, weights_only=True)

    torch.manual_seed(1)  # a different init, which must not become the anchor
    resumed, rec = model(), AnchorRecorder()
    resumed_trainer = fast_trainer(max_steps=3, callbacks=[rec, checkpointer(tmp_path / "first")],
                                   enable_checkpointing=True, limit_val_batches=1)
    resumed_trainer.fit(resumed, datamodule=data(), ckpt_path=str(path))
    assert resumed_trainer.global_step == 3
    for a, b in zip(rec.first["anchor"], theta0):
        assert torch.equal(a, b)
    params = rec.first["params"]
    for p, q in zip(params, first.parameters()):  # resumed from the checkpointed weights
        assert torch.equal(p, q.detach())
    l2_init, wasserstein = rec.first["l2_init"], rec.first["wasserstein"]
    assert l2_init > 0 and wasserstein > 0
    assert l2_init == pytest.approx(l2_init_penalty(params, theta0).item(), rel=1e-6)
    assert wasserstein == pytest.approx(wasserstein_init_penalty(params, theta0).item(),
                                        rel=1e-6)


def test_two_mixins_on_a_foreign_module_through_the_cli(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 3
  logger: false
  enable_progress_bar: false
  enable_checkpointing: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  limit_val_batches: 1
  default_root_dir: {tmp_path}
model:
  class_path: {RegularizedForeignNet.__module__}.RegularizedForeignNet
  init_args:
    hidden: 16
    l2er_coef: 0.01
    l2er_l2_coef: 0.1
    wasserstein_coef: 0.5
data:
  class_path: ContinualDataModule
  init_args:
    dataset: digits
    num_tasks: 1
    steps_per_task: 3
    batch_size: 16
""")
    cli = run_cli(["fit", "--config", str(config)])
    assert isinstance(cli.model, RegularizedForeignNet)
    assert cli.trainer.global_step == 3
    metrics = cli.trainer.callback_metrics
    assert {"reg/l2er", "reg/l2er_effective_rank", "reg/wasserstein_init"} <= set(metrics)
    assert metrics["reg/wasserstein_init"] > 0
    assert 1 < metrics["reg/l2er_effective_rank"] <= 16
    hp = cli.model.hparams
    assert (hp.l2er_coef, hp.l2er_l2_coef, hp.wasserstein_coef, hp.hidden) == (0.01, 0.1, 0.5, 16)


def test_recipe_resolves_the_composed_classifier(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(REPO / "recipes" / "l2_init.yaml"), "--print_config"])
    out = capsys.readouterr().out
    assert "class_path: lightning_plasticity.regularizers.L2InitWassersteinClassifier" in out
    assert "l2_init_coef:" in out and "wasserstein_coef:" in out


@pytest.mark.parametrize("cls, kwargs, match", [
    (L2Regularizer, {"l2_coef": -1.0}, "l2_coef must be a number >= 0"),
    (L2InitRegularizer, {"l2_init_coef": -1e-3}, "l2_init_coef must be a number >= 0"),
    (WassersteinInitRegularizer, {"wasserstein_coef": -0.1}, "wasserstein_coef must be"),
    (L2ERRegularizer, {"l2er_coef": -1.0}, "l2er_coef must be a number >= 0"),
    (L2ERRegularizer, {"l2er_l2_coef": -1.0}, "l2er_l2_coef must be a number >= 0"),
    (L2ERRegularizer, {"l2er_reduction": "mean"}, "choose 'sum' or 'direct_sum'"),
])
def test_bad_options_say_what_to_change(cls: type, kwargs: dict[str, Any], match: str) -> None:
    composed = type("Composed", (cls, ForeignNet), {})
    with pytest.raises(ValueError, match=match):
        composed(**kwargs)


def test_mixin_after_the_module_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"Put L2InitRegularizer before ForeignNet in the class "
                                        r"bases: class Bad\(L2InitRegularizer, ForeignNet\)"):
        class Bad(ForeignNet, L2InitRegularizer):
            pass
    with pytest.raises(TypeError, match="Put WassersteinInitRegularizer before "
                                        "ContinualClassifier"):
        class Bad2(L2Regularizer, ContinualClassifier, WassersteinInitRegularizer):
            pass


def test_manual_optimization_is_rejected() -> None:
    model = RegularizedPlainNet()
    model.automatic_optimization = False
    with pytest.raises(RuntimeError, match="use automatic optimization"):
        model.on_fit_start()


def test_checkpoint_without_anchor_warns_and_anchors_at_fit_start() -> None:
    model = RegularizedPlainNet()
    with pytest.warns(UserWarning, match="checkpoint has no initial parameters"):
        model.on_load_checkpoint({})
    model.on_fit_start()
    for a, p in zip(model._init_anchor.values(), model.parameters()):
        assert torch.equal(a, p.detach())
