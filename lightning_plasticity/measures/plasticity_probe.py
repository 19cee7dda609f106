"""Plasticity probe: how well a copy of the network fits a fresh random task.

Lyle et al. (2023), "Understanding plasticity in neural networks", define the plasticity of
parameters ``theta`` as the loss reduction a fixed optimisation budget achieves on a new task
drawn from a family of tasks: start from ``theta``, optimise the new task's loss ``L`` for a
fixed number of steps, and compare ``L`` before and after (they report ``L(theta_final)`` and
the drop ``L(theta) - L(theta_final)``; a network that lost plasticity reduces the loss less).
Their probe tasks regress randomly generated targets. Here the new task is, on the probe inputs
``x_1..x_n``:

* ``target="regression"``: i.i.d. Gaussian targets ``y_i ~ N(0, target_scale^2 I_C)`` with
  ``C`` the model's output size, loss ``mean_i mean_c (f_c(x_i) - y_ic)^2`` (MSE); or
* ``target="labels"``: uniformly random labels ``y_i in {0..K-1}`` (``K = num_outputs``,
  default the output size), loss the mean cross-entropy.

Both are unrelated to the inputs, so fitting them measures the network's raw capacity to
change its function on these inputs. The model is deep-copied (the original, its gradients,
mode and optimiser are never touched), the copy is put in train mode and trained with a fresh
optimiser (Adam or SGD) for ``steps`` full-batch steps (or minibatch steps of ``batch_size``
examples drawn without replacement, reshuffled every epoch). The reported initial and final
losses are evaluated on all probe inputs with the copy in eval mode (no dropout; BatchNorm with
its running statistics, which the training steps updated), so they are deterministic functions
of the parameters. With ``fresh_model`` (a freshly initialised network of the same
architecture) the same task is fitted from it too: ``final_loss / fresh_final_loss`` compares the
trained network's plasticity with that of a new one (1: no loss of plasticity).

Everything is a function of ``seed``: targets and minibatches come from a ``torch.Generator``
seeded with it, and the global RNG (dropout) is forked, seeded with it and restored afterwards.

DDP: every rank can run the probe on the same full probe batch (identical results, no
collective); the copy is not wrapped in DDP. Pass the bare network (e.g.
``pl_module.network``), not a LightningModule, which would deep-copy its trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_plasticity.core.batch import batch_size as num_examples
from lightning_plasticity.core.batch import detach_clone, index_batch, tensor_leaves
from lightning_plasticity.core.initialization import clean_copy
from lightning_plasticity.core.isolation import forked_rng

__all__ = ["PlasticityProbe", "plasticity_probe"]

ProbeTarget = Literal["regression", "labels"]
ProbeOptimizer = Literal["adam", "sgd"]


@dataclass(frozen=True)
class PlasticityProbe:
    """Result of :func:`plasticity_probe` (``nan`` fields without ``fresh_model``).

    Attributes:
        initial_loss: Loss of the (copied) network on the random task before training.
        final_loss: Loss after ``steps`` optimisation steps.
        loss_reduction: ``initial_loss - final_loss`` (Lyle et al.'s plasticity).
        loss_ratio: ``final_loss / initial_loss`` (``nan`` if ``initial_loss`` is 0).
        losses: ``(steps,)`` training loss of each step (train mode, the step's minibatch).
        fresh_initial_loss: The fresh network's initial loss.
        fresh_final_loss: The fresh network's final loss.
        fresh_loss_reduction: ``fresh_initial_loss - fresh_final_loss``.
        relative_final_loss: ``final_loss / fresh_final_loss``.
        steps: Optimisation steps.
        target: ``"regression"`` or ``"labels"``.
    """

    initial_loss: float
    final_loss: float
    loss_reduction: float
    loss_ratio: float
    losses: Tensor
    fresh_initial_loss: float
    fresh_final_loss: float
    fresh_loss_reduction: float
    relative_final_loss: float
    steps: int
    target: str

    def scalars(self) -> dict[str, float]:
        """The scalar fields as floats for logging, without ``nan`` entries.

        Example::

            >>> import torch
            >>> from lightning_plasticity.measures.plasticity_probe import plasticity_probe
            >>> from lightning_plasticity.models import MLP
            >>> _ = torch.manual_seed(0)
            >>> net = MLP((8,), 3, width=16)
            >>> result = plasticity_probe(net, torch.randn(32, 8), steps=5)
            >>> logged = {f"probe/{k}": v for k, v in result.scalars().items()}
            >>> sorted(logged)  # no fresh_model: its nan entries are left out
            ['probe/final_loss', 'probe/initial_loss', 'probe/loss_ratio', 'probe/loss_reduction']
            >>> # in a LightningModule or Callback hook: pl_module.log_dict(logged)
        """
        keys = (
            "initial_loss",
            "final_loss",
            "loss_reduction",
            "loss_ratio",
            "fresh_initial_loss",
            "fresh_final_loss",
            "fresh_loss_reduction",
            "relative_final_loss",
        )
        out = {k: float(getattr(self, k)) for k in keys}
        return {k: v for k, v in out.items() if not math.isnan(v)}


def _device_of(model: nn.Module, inputs: Any) -> torch.device:
    for p in model.parameters():
        return p.device
    leaves = tensor_leaves(inputs)
    return leaves[0].device if leaves else torch.device("cpu")


def _seed_global(seed: int, device: torch.device) -> None:
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _copy(model: nn.Module) -> nn.Module:
    try:
        clone = clean_copy(model)
    except Exception as err:  # re-raised with a hint
        raise ValueError(
            f"cannot deep-copy {type(model).__name__} for the plasticity probe ({err}); pass "
            "the bare network (e.g. pl_module.network) rather than a wrapper."
        ) from err
    for p in clone.parameters():
        p.grad = None
    return clone


def _loss(output: Tensor, targets: Tensor, target: ProbeTarget) -> Tensor:
    if target == "regression":
        return F.mse_loss(output.reshape(output.shape[0], -1), targets)
    return F.cross_entropy(output, targets)


def _eval_loss(model: nn.Module, inputs: Tensor, targets: Tensor, target: ProbeTarget) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        value = float(_loss(model(inputs), targets, target))
    model.train(was_training)
    return value


def _fit(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    target: ProbeTarget,
    steps: int,
    lr: float,
    optimizer: ProbeOptimizer,
    batch_size: int | None,
    seed: int,
) -> tuple[float, float, Tensor]:
    """Train ``model`` (a copy) in place; return initial loss, final loss and step losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "the model has no trainable parameters (requires_grad=True), so the plasticity "
            "probe cannot train it."
        )
    optimizer_cls = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    opt = optimizer_cls(params, lr=lr)
    n = num_examples(inputs)
    gen = torch.Generator().manual_seed(seed + 1)  # minibatch order, independent of targets
    order = torch.randperm(n, generator=gen)
    cursor = 0
    losses = torch.empty(steps, dtype=torch.float64)
    initial = _eval_loss(model, inputs, targets, target)
    model.train()
    for step in range(steps):
        if batch_size is None or batch_size >= n:
            x, y = inputs, targets
        else:
            if cursor + batch_size > n:
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor : cursor + batch_size]
            cursor += batch_size
            x, y = index_batch(inputs, idx), targets[idx.to(targets.device)]
        opt.zero_grad(set_to_none=True)
        loss = _loss(model(x), y, target)
        loss.backward()
        opt.step()
        losses[step] = float(loss.detach())
    final = _eval_loss(model, inputs, targets, target)
    return initial, final, losses


def plasticity_probe(
    model: nn.Module,
    inputs: Tensor,
    *,
    num_outputs: int | None = None,
    steps: int = 100,
    lr: float = 1e-3,
    optimizer: ProbeOptimizer = "adam",
    target: ProbeTarget = "regression",
    batch_size: int | None = None,
    target_scale: float = 1.0,
    seed: int = 0,
    fresh_model: nn.Module | None = None,
) -> PlasticityProbe:
    """Fit a copy of the model to random targets on ``inputs`` and report the loss reduction.

    Definition and procedure in the module docstring (Lyle et al., 2023). Neither ``model`` nor
    ``fresh_model`` is modified (parameters, gradients, mode, buffers), nor is the global RNG
    state.

    Args:
        model: The network; ``model(inputs)`` must return ``(n, C)`` outputs (any trailing
            shape for regression, flattened to ``C``).
        inputs: ``(n, ...)`` probe inputs, or any batch structure ``model`` takes.
        num_outputs: Regression: must equal ``C`` if given. Labels: number of classes ``K <= C``
            (default ``C``).
        steps: Optimisation steps.
        lr: Learning rate.
        optimizer: ``"adam"`` or ``"sgd"`` (plain, no momentum).
        target: ``"regression"`` (Gaussian targets, MSE) or ``"labels"`` (random labels,
            cross-entropy).
        batch_size: Minibatch size; default (``None``) full batch.
        target_scale: Standard deviation of the regression targets.
        seed: Seeds the targets, the minibatch order and the global RNG during training.
        fresh_model: Optional freshly initialised network of the same architecture, probed
            with the same task for comparison.

    Returns:
        A :class:`PlasticityProbe`.

    Raises:
        ValueError: On bad options, outputs whose shape does not fit ``target``, or a model
            without trainable parameters.

    Example::

        >>> import math
        >>> import torch
        >>> from lightning_plasticity.measures.plasticity_probe import plasticity_probe
        >>> from lightning_plasticity.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> net = MLP((8,), 3, width=16)
        >>> x_probe = torch.randn(32, 8)
        >>> result = plasticity_probe(net, x_probe, steps=20, fresh_model=MLP((8,), 3, width=16))
        >>> result.steps, result.losses.shape
        (20, torch.Size([20]))
        >>> result.loss_reduction > 0, math.isfinite(result.relative_final_loss)
        (True, True)
    """
    if target not in ("regression", "labels"):
        raise ValueError(f"target must be 'regression' or 'labels', got {target!r}.")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}.")
    if steps < 0 or lr <= 0 or (batch_size is not None and batch_size < 1) or target_scale <= 0:
        raise ValueError(
            f"need steps >= 0, lr > 0, batch_size >= 1 (or None) and target_scale > 0; got "
            f"steps={steps}, lr={lr}, batch_size={batch_size}, target_scale={target_scale}."
        )
    if not num_examples(inputs):
        raise ValueError("inputs must hold at least one example along dim 0 (a tensor or any "
                         "batch structure the model takes).")
    device = _device_of(model, inputs)
    with torch.inference_mode(False), torch.enable_grad(), forked_rng(device=device):
        x = detach_clone(inputs)  # normal tensors even if inputs were made in inference mode
        runs = [_copy(model)] + ([_copy(fresh_model)] if fresh_model is not None else [])
        n = num_examples(x)
        with torch.no_grad():
            runs[0].eval()
            out = runs[0](x)
        C = out[0].numel()
        gen = torch.Generator().manual_seed(seed)
        if target == "regression":
            if num_outputs is not None and num_outputs != C:
                raise ValueError(
                    f"num_outputs={num_outputs} but the model has {C} outputs per example; the "
                    "probe regresses on the model's own outputs (leave num_outputs=None)."
                )
            y = torch.randn(n, C, generator=gen, dtype=torch.float64) * target_scale
            y = y.to(device=out.device, dtype=out.dtype)
        else:
            if out.dim() != 2:
                raise ValueError(
                    f"target='labels' needs (n, C) logits, the model returns {tuple(out.shape)}."
                )
            K = C if num_outputs is None else num_outputs
            if not 1 <= K <= C:
                raise ValueError(f"num_outputs must be in [1, {C}] for labels, got {K}.")
            y = torch.randint(0, K, (n,), generator=gen).to(out.device)
        results = []
        for run in runs:
            # Same global RNG stream (dropout) for both networks.
            _seed_global(seed, device)
            results.append(
                _fit(
                    run, x, y, target=target, steps=steps, lr=lr, optimizer=optimizer,
                    batch_size=batch_size, seed=seed,
                )
            )
    initial, final, losses = results[0]
    if len(results) > 1:
        f_initial, f_final, _ = results[1]
    else:
        f_initial = f_final = math.nan
    return PlasticityProbe(
        initial_loss=initial,
        final_loss=final,
        loss_reduction=initial - final,
        loss_ratio=final / initial if initial != 0 else math.nan,
        losses=losses,
        fresh_initial_loss=f_initial,
        fresh_final_loss=f_final,
        fresh_loss_reduction=f_initial - f_final,
        relative_final_loss=final / f_final if f_final != 0 else math.nan,
        steps=steps,
        target=target,
    )
