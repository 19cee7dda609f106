"""Unit-level activity: dead, dormant, rarely active, linearized and saturated units.

A forward pass over a probe batch records, for every activation module (``nn.ReLU``,
``nn.LeakyReLU``, ``nn.GELU``, ``nn.Tanh``, ``nn.Sigmoid`` and the package's
:class:`~lightning_plasticity.models.activations.CReLU`), its output ``h`` and its input (the
pre-activation ``z``), and for every ``nn.Linear`` / ``nn.Conv2d`` its output (also a
pre-activation). The measures follow:

* Dohare et al. (2024), "Loss of plasticity in deep continual learning", Nature: *dead* units
  (a ReLU unit whose output is zero on every input no longer learns) and units that are active on
  only a small fraction of inputs (here *rarely active*).
* Sokar et al. (2023), "The dormant neuron phenomenon in deep reinforcement learning" (ReDo):
  *tau-dormant* units, whose activation is small relative to the rest of their layer.
* Lyle et al. (2024), "Disentangling the causes of plasticity loss in neural networks": unit
  *linearization* (a ReLU whose pre-activation is positive on every input acts as the identity)
  and *saturation* of bounded activations, and growth of the pre-activation distribution.

Units and positions
-------------------
A recorded tensor is read as ``(n, units, positions)``: ``(n, D)`` has ``D`` units;
``(n, C, H, W)`` (convolutions) has ``C`` channel units at ``H * W`` positions; ``(n, T, D)`` is a
token sequence (as in the ViT: ``nn.Linear`` on tokens) with ``D`` units at ``T`` positions;
:class:`CReLU` uses its own ``dim``. (A ``Conv1d`` output ``(n, C, L)`` would be misread as
tokens; only ``Linear`` and ``Conv2d`` layers are recorded.) A unit is judged *per input*,
across its positions, by asking whether it still passes gradient or still acts nonlinearly on
that input:

* *active* on an input: non-zero at **some** position (``max_p |h| > 0``);
* *linearized* on an input: pre-activation positive at **every** position;
* *saturated* on an input: saturated at **every** position;
* its ReDo activation on an input is the **mean** over positions of ``|h|``.

With one position (fully connected layers) these are the usual per-example definitions.

Definitions (``n`` probe inputs, ``h_i(x)`` unit ``i``'s output on input ``x``)
------------------------------------------------------------------------------
* ``active_fraction_i = #{x : unit i active on x} / n``.
* dead: ``active_fraction_i == 0`` (exactly zero on every input and position). ReLU, CReLU.
* rarely active: ``active_fraction_i < rare_fraction`` (default 0.01, i.e. active on fewer than
  1 % of inputs; dead units included). ReLU, CReLU.
* ReDo score (Sokar et al., 2023, eq. 1): ``s_i = E_x|h_i(x)| / ((1/K) sum_k E_x|h_k(x)|)`` over
  the ``K`` units of the layer; unit ``i`` is *tau-dormant* if ``s_i <= tau`` (``<=`` as in the
  paper). ``tau = 0`` makes dormant equal to dead for ReLU (``s_i = 0`` iff ``h_i`` is zero on
  every input); Sokar et al. report ``tau = 0.025`` (the default here) and ``0.1``. A layer whose
  units are all zero has every score 0. All activation kinds.
* linearized: ``z_i(x) > 0`` on every input (and position): the ReLU acts as the identity on the
  data, so the unit adds no nonlinearity. Measured on the *input* units of the activation (for
  CReLU, whose output is ``(relu(z), relu(-z))``, a linearized input unit means one half is the
  identity and the other dead). ReLU, CReLU, LeakyReLU, GELU.
* saturated: ``|h_i(x)| > saturation_threshold`` for tanh, ``h_i(x) > t`` or ``h_i(x) < 1 - t``
  for sigmoid (``t = saturation_threshold``, default 0.99), on every input. Tanh, Sigmoid.
* pre-activation mean and std: the mean and (population) standard deviation of all values
  ``z_i(x)`` over inputs, positions and units of the layer (for an activation module, its input;
  for a ``Linear``/``Conv2d``, its output). The activation mean/std are the same for ``h``.

Metrics that do not apply to a layer's activation kind are ``nan`` (fractions) with all-False
masks and a count of 0, and are left out of the overall totals, which pool the units of the
layers where they apply (``dead_fraction = total dead / total units of ReLU/CReLU layers``).

DDP
---
Computation is split in two: :func:`unit_activity_stats` returns per-layer *sufficient
statistics* that are sums and counts over the inputs of one shard, and
:func:`unit_activity_from_stats` turns them into metrics. Summing the statistics of all shards
(:func:`reduce_unit_activity_stats`, one collective on one flat float64 tensor) gives exactly the
statistics of one process on the whole batch, so a unit is dead only if it is zero on every
rank's shard. Every rank must record the same layers (same model, same control flow).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_plasticity.core.batch import tensor_leaves
from lightning_plasticity.core.isolation import forked_rng, module_device, preserved_buffers
from lightning_plasticity.core.record import LayerCall, hooked
from lightning_plasticity.core.reduction import reduce_stats, stat
from lightning_plasticity.models.activations import CReLU

__all__ = [
    "LayerActivity",
    "LayerActivityStats",
    "UnitActivity",
    "collect_activations",
    "reduce_unit_activity_stats",
    "unit_activity",
    "unit_activity_from_stats",
    "unit_activity_stats",
    "unit_activity_stats_of_pass",
]

#: What a recorded module is: an activation function or a layer whose output is a pre-activation.
LayerKind = Literal["relu", "crelu", "leaky_relu", "gelu", "tanh", "sigmoid", "linear", "conv2d"]
#: Sums a tensor across DDP ranks (``all_reduce(SUM)``), or ``None``.
ReduceSum = Callable[[Tensor], Tensor]

_ACTIVATION_KINDS = ("relu", "crelu", "leaky_relu", "gelu", "tanh", "sigmoid")
_DEAD_KINDS = ("relu", "crelu")
_LINEARIZED_KINDS = ("relu", "crelu", "leaky_relu", "gelu")
_SATURATING_KINDS = ("tanh", "sigmoid")
# Order matters: CReLU before the generic checks, LeakyReLU is not a ReLU subclass.
_MODULE_KINDS: tuple[tuple[type[nn.Module], LayerKind], ...] = (
    (CReLU, "crelu"),
    (nn.ReLU, "relu"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.GELU, "gelu"),
    (nn.Tanh, "tanh"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Linear, "linear"),
    (nn.Conv2d, "conv2d"),
)
_MAX_NAMES_IN_ERROR = 12


# ----------------------------------------------------------------------------- recording
def _kind(module: nn.Module) -> LayerKind | None:
    for cls, kind in _MODULE_KINDS:
        if isinstance(module, cls):
            return kind
    return None


def _select_modules(
    model: nn.Module, layers: list[str] | tuple[str, ...] | None
) -> tuple[list[tuple[str, nn.Module, LayerKind]], set[str]]:
    """Every recordable module, and the names of those the fnmatch ``layers`` select."""
    eligible = []
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is not None:
            eligible.append((name or "(root)", module, kind))
    if not eligible:
        raise ValueError(
            "the model has no module to record: unit activity needs nn.Linear/nn.Conv2d layers "
            "(whose inputs are the units feeding them, whatever the activation) or activation "
            "modules (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, CReLU)."
        )
    names = [n for n, _, _ in eligible]
    if layers is None:
        return eligible, set(names)
    if isinstance(layers, str):
        layers = [layers]
    for pattern in layers:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(repr(n) for n in names[:_MAX_NAMES_IN_ERROR])
            if len(names) > _MAX_NAMES_IN_ERROR:
                shown += f", ... ({len(names) - _MAX_NAMES_IN_ERROR} more)"
            raise ValueError(
                f"layers pattern {pattern!r} matches no recordable module; recordable modules "
                f"are {shown}."
            )
    return eligible, {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in layers)}


def _storage(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(t)


def _infer_kind(x: Tensor) -> LayerKind | None:
    """The activation behind features no activation module produced (``F.relu``, ``torch.tanh``).

    Non-negative features are read as ReLU units (dead = zero on every input); features in
    ``[-1, 1]`` with negative values as tanh units; anything else (a norm's output, a residual
    sum) is not a layer of units and is not recorded.
    """
    if x.numel() == 0 or not x.is_floating_point():
        return None
    if bool((x >= 0).all()):
        return "relu"
    if bool((x.abs() <= 1).all()):
        return "tanh"
    return None


def _record_pass(
    model: nn.Module,
    run: Callable[[], Any],
    layers: list[str] | tuple[str, ...] | None,
    data: Any,
    record: Callable[[str, nn.Module, LayerKind, Tensor | None, Tensor], None],
) -> None:
    """Run ``run()`` once, calling ``record(key, module, kind, input, output)`` for every layer.

    Recorded: every activation module (its output ``h`` and input ``z``); every
    ``nn.Linear``/``nn.Conv2d`` output (a pre-activation); and the *input* of a ``Linear``/
    ``Conv2d`` when no activation module produced it (key ``"<layer>.input"``, kind inferred by
    :func:`_infer_kind`), which makes functional activations (``F.relu``, ``torch.relu``)
    visible. Inputs that are the data (the first layer called, or a view of a batch tensor) or
    that an activation module already recorded are skipped. A module called several times gets
    keys ``name``, ``name#1``, ...
    """
    eligible, selected = _select_modules(model, layers)
    data_storages = {_storage(t) for t in tensor_leaves(data)}
    activation_storages: set[int] = set()
    state = {"activation_since_layer": False, "layers_called": 0}

    def on_call(call: LayerCall) -> None:
        kind = _kind(call.module)
        if kind is None:
            return
        key = call.name if call.index == 0 else f"{call.name}#{call.index}"
        chosen = call.name in selected
        if kind in _ACTIVATION_KINDS:
            state["activation_since_layer"] = True
            activation_storages.add(_storage(call.output))
            if chosen:
                record(key, call.module, kind, call.input, call.output)
            return
        x = call.input
        first = state["layers_called"] == 0
        fed_by_activation = state["activation_since_layer"] or (
            x is not None and _storage(x) in activation_storages)
        state["layers_called"] += 1
        state["activation_since_layer"] = False
        if not chosen:
            return
        record(key, call.module, kind, None, call.output)
        if x is None or first or fed_by_activation or _storage(x) in data_storages:
            return
        inferred = _infer_kind(x)
        if inferred is not None:
            record(f"{key}.input", call.module, inferred, x, x)

    modules = {name: module for name, module, _ in eligible}
    with hooked(modules, on_call):
        run()


@contextmanager
def _isolated_forward(model: nn.Module) -> Iterator[None]:
    """``model(inputs)`` without side effects on the global RNG or the buffers, no graph."""
    with forked_rng(device=module_device(model)), preserved_buffers(model), torch.no_grad():
        yield


def collect_activations(
    model: nn.Module, inputs: Any, layers: list[str] | tuple[str, ...] | None = None
) -> dict[str, Tensor]:
    """Record the outputs of activation modules and of ``Linear``/``Conv2d`` layers.

    Forward hooks on every ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.GELU``, ``nn.Tanh``, ``nn.Sigmoid``
    and :class:`CReLU` (their outputs, the activations) and every ``nn.Linear`` and ``nn.Conv2d``
    (their outputs, pre-activations) record one ``model(inputs)`` under ``torch.no_grad``. The
    model runs in whatever mode it is in (callers normally use eval mode); the hooks are removed
    afterwards and the global RNG state and the buffers (BatchNorm running statistics in train
    mode) are restored. A module called several times gets keys ``name``, ``name#1``, ...

    Args:
        model: The model; ``model(inputs)`` is called once.
        inputs: The probe inputs.
        layers: Optional fnmatch patterns on module names (``"layers.*.act"``, ``"head"``);
            every pattern must match a recordable module. Default: all recordable modules.

    Returns:
        Module name -> detached output, in forward order.

    Raises:
        ValueError: If the model has no recordable module or a pattern matches none.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_plasticity.measures.unit_activity import collect_activations
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> acts = collect_activations(model.eval(), torch.randn(16, 4), layers=["1"])
        >>> acts["1"].shape
        torch.Size([16, 8])
    """
    out: dict[str, Tensor] = {}

    def record(key: str, module: nn.Module, kind: LayerKind, pre: Tensor | None, h: Tensor) -> None:
        # A copy: a later in-place activation would overwrite a Linear's output tensor.
        out[key] = h.detach().clone()

    with _isolated_forward(model):
        _record_pass(model, lambda: model(inputs), layers, inputs, record)
    return out


# ----------------------------------------------------------------------------- statistics
def _unit_dim(module: nn.Module, t: Tensor) -> int:
    if isinstance(module, CReLU):
        return module.dim % t.dim()
    return t.dim() - 1 if t.dim() == 3 else min(1, t.dim() - 1)


def _as_units(t: Tensor, unit_dim: int) -> Tensor:
    """``(n, units, positions)`` view of a recorded tensor."""
    if t.dim() == 1:
        return t.reshape(-1, 1, 1)
    return t.movedim(unit_dim, 1).reshape(t.shape[0], t.shape[unit_dim], -1)


@dataclass(frozen=True)
class LayerActivityStats:
    """Sufficient statistics of one layer on a shard: sums and counts over its inputs.

    Every tensor is float64; summing the statistics of disjoint shards gives those of their
    union. For ``Linear``/``Conv2d`` layers (``kind`` ``"linear"``/``"conv2d"``) the output is the
    pre-activation: the ``pre_*`` fields describe it and the activation fields have 0 units.

    Attributes:
        kind: The layer kind (``"relu"``, ``"crelu"``, ..., ``"linear"``, ``"conv2d"``).
        num_examples: 0-d, number of inputs ``n``.
        num_values: 0-d, ``n * positions`` of the activation output.
        active_count: ``(U,)`` inputs on which the unit is non-zero at some position.
        abs_mean_sum: ``(U,)`` sum over inputs of the mean over positions of ``|h|``.
        sum: ``(U,)`` sum over inputs and positions of ``h``.
        sq_sum: ``(U,)`` sum over inputs and positions of ``h ** 2``.
        saturated_count: ``(U,)`` inputs on which the unit is saturated at every position
            (tanh/sigmoid; zeros otherwise).
        num_pre_values: 0-d, ``n * positions`` of the pre-activation.
        pre_positive_count: ``(U_in,)`` inputs on which the pre-activation is positive at
            every position.
        pre_sum: ``(U_in,)`` sum over inputs and positions of the pre-activation.
        pre_sq_sum: ``(U_in,)`` sum over inputs and positions of its square.
    """

    kind: str
    num_examples: Tensor = stat("sum")
    num_values: Tensor = stat("sum")
    active_count: Tensor = stat("sum")
    abs_mean_sum: Tensor = stat("sum")
    sum: Tensor = stat("sum")
    sq_sum: Tensor = stat("sum")
    saturated_count: Tensor = stat("sum")
    num_pre_values: Tensor = stat("sum")
    pre_positive_count: Tensor = stat("sum")
    pre_sum: Tensor = stat("sum")
    pre_sq_sum: Tensor = stat("sum")

    def tensors(self) -> list[Tensor]:
        """The statistics in field order (everything but ``kind``)."""
        return [getattr(self, f.name) for f in fields(self) if f.name != "kind"]


def _layer_stats(
    module: nn.Module,
    kind: LayerKind,
    pre: Tensor | None,
    out: Tensor,
    saturation_threshold: float,
) -> LayerActivityStats:
    f64 = torch.float64
    dev = out.device
    is_activation = kind in _ACTIVATION_KINDS
    z_src = pre if is_activation else out
    if z_src is None or z_src.dim() == 0:
        raise ValueError(f"cannot read the pre-activation of a {type(module).__name__} module.")
    z = _as_units(z_src.detach(), _unit_dim(module, z_src))
    n = z.shape[0]
    pre_positive = (z > 0).all(dim=2).sum(0).to(f64)
    pre_sum = z.sum(dim=(0, 2), dtype=f64)
    pre_sq_sum = z.square().sum(dim=(0, 2), dtype=f64)
    num_pre = torch.tensor(float(z.shape[0] * z.shape[2]), dtype=f64, device=dev)
    if is_activation:
        h = _as_units(out.detach(), _unit_dim(module, out))
        active = (h != 0).any(dim=2).sum(0).to(f64)
        acc = torch.promote_types(h.dtype, torch.float32)
        abs_mean_sum = h.abs().mean(dim=2, dtype=acc).sum(0, dtype=f64)
        h_sum = h.sum(dim=(0, 2), dtype=f64)
        h_sq = h.square().sum(dim=(0, 2), dtype=f64)
        if kind == "tanh":
            sat = (h.abs() > saturation_threshold).all(dim=2).sum(0).to(f64)
        elif kind == "sigmoid":
            t = saturation_threshold
            sat = ((h > t) | (h < 1 - t)).all(dim=2).sum(0).to(f64)
        else:
            sat = torch.zeros(h.shape[1], dtype=f64, device=dev)
        num_values = torch.tensor(float(h.shape[0] * h.shape[2]), dtype=f64, device=dev)
    else:
        empty = torch.zeros(0, dtype=f64, device=dev)
        active = abs_mean_sum = h_sum = h_sq = sat = empty
        num_values = torch.zeros((), dtype=f64, device=dev)
    return LayerActivityStats(
        kind=kind,
        num_examples=torch.tensor(float(n), dtype=f64, device=dev),
        num_values=num_values,
        active_count=active,
        abs_mean_sum=abs_mean_sum,
        sum=h_sum,
        sq_sum=h_sq,
        saturated_count=sat,
        num_pre_values=num_pre,
        pre_positive_count=pre_positive,
        pre_sum=pre_sum,
        pre_sq_sum=pre_sq_sum,
    )


def unit_activity_stats(
    model: nn.Module,
    inputs: Any,
    layers: list[str] | tuple[str, ...] | None = None,
    *,
    saturation_threshold: float = 0.99,
) -> dict[str, LayerActivityStats]:
    """Sufficient statistics of every recorded layer on this shard (see the module docstring).

    The statistics are computed inside the forward hooks, so the activations of the whole
    network are never held at once.

    Args:
        model: The model (normally in eval mode; it is not modified).
        inputs: This shard's probe inputs; ``model(inputs)`` is called once.
        layers: Optional fnmatch patterns on module names, as in :func:`collect_activations`.
        saturation_threshold: ``t`` in ``|tanh| > t`` and ``sigmoid > t or < 1 - t``; in
            ``(0.5, 1)``.

    Returns:
        Module name -> :class:`LayerActivityStats`, in forward order.

    Raises:
        ValueError: On a bad threshold, a model with no recordable module, or an unmatched
            pattern.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_plasticity.measures.unit_activity import (
        ...     reduce_unit_activity_stats, unit_activity_from_stats, unit_activity_stats)
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
        >>> x_shard = torch.randn(16, 4)  # this rank's examples
        >>> stats = unit_activity_stats(model, x_shard)
        >>> sorted(stats), int(stats["1"].num_examples)
        (['0', '1', '2'], 16)
        >>> all_reduce_sum = lambda t: t  # one process; under DDP: torch.distributed.all_reduce
        >>> stats = reduce_unit_activity_stats(stats, all_reduce_sum)
        >>> result = unit_activity_from_stats(stats, tau=0.025)
        >>> result.layers["1"].num_units, result.layers["1"].dead.shape
        (8, torch.Size([8]))
    """
    _check_saturation(saturation_threshold)
    with _isolated_forward(model):
        return unit_activity_stats_of_pass(model, lambda: model(inputs), inputs, layers,
                                           saturation_threshold=saturation_threshold)


def unit_activity_stats_of_pass(
    model: nn.Module,
    run: Callable[[], Any],
    data: Any = None,
    layers: list[str] | tuple[str, ...] | None = None,
    *,
    saturation_threshold: float = 0.99,
) -> dict[str, LayerActivityStats]:
    """Sufficient statistics of every recorded layer during one call of ``run()``.

    ``run`` is any pass through ``model``: ``model(inputs)``, or the user's own loss on a batch
    (``training_step``), so models without ``forward`` and any batch structure work. ``data`` is
    the batch, whose tensors are not units. The caller isolates side effects (RNG, buffers).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import torch.nn.functional as F
        >>> fc1, fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
        >>> with torch.no_grad():
        ...     _ = fc1.bias[:3].fill_(-100.0)  # three units dead on every input
        >>> model = nn.ModuleDict({"fc1": fc1, "fc2": fc2})
        >>> x = torch.randn(32, 4)
        >>> stats = unit_activity_stats_of_pass(model, lambda: fc2(F.relu(fc1(x))), x)
        >>> int(unit_activity_from_stats(stats, tau=0.0).num_dead)
        3
    """
    _check_saturation(saturation_threshold)
    out: dict[str, LayerActivityStats] = {}

    def record(key: str, module: nn.Module, kind: LayerKind, pre: Tensor | None, h: Tensor) -> None:
        out[key] = _layer_stats(module, kind, pre, h, saturation_threshold)

    _record_pass(model, run, layers, data, record)
    return out


def _check_saturation(saturation_threshold: float) -> None:
    if not 0.5 < saturation_threshold < 1:
        raise ValueError(
            f"saturation_threshold must be in (0.5, 1), got {saturation_threshold}; it is the "
            "|tanh| (and sigmoid) level above which a unit counts as saturated, e.g. 0.99."
        )


def reduce_unit_activity_stats(
    stats: dict[str, LayerActivityStats], reduce_sum: ReduceSum
) -> dict[str, LayerActivityStats]:
    """Sum the statistics across ranks with one call of ``reduce_sum`` on a flat tensor.

    Args:
        stats: This rank's statistics from :func:`unit_activity_stats`; every rank must hold
            the same layers with the same shapes.
        reduce_sum: Sums a tensor across ranks (e.g. ``all_reduce`` with ``SUM``) and returns
            the result.

    Returns:
        The summed statistics, equal to those of one process on the union of the shards.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_plasticity.measures.unit_activity import (
        ...     reduce_unit_activity_stats, unit_activity_stats)
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
        >>> x = torch.randn(32, 4)
        >>> x_shard, other_shard = x.chunk(2)  # the examples of two ranks
        >>> # Under DDP: def all_reduce_sum(t): torch.distributed.all_reduce(t); return t.
        >>> # Here two ranks are simulated: the other rank's flat statistics are added by hand.
        >>> flat = []
        >>> _ = reduce_unit_activity_stats(unit_activity_stats(model, other_shard),
        ...                                lambda t: flat.append(t) or t)
        >>> all_reduce_sum = lambda t: t + flat[0]
        >>> total = reduce_unit_activity_stats(unit_activity_stats(model, x_shard), all_reduce_sum)
        >>> whole = unit_activity_stats(model, x)  # one process on the union of the shards
        >>> int(total["1"].num_examples)
        32
        >>> all(torch.allclose(a, b) for k in whole
        ...     for a, b in zip(total[k].tensors(), whole[k].tensors()))
        True
    """
    if not stats:
        return {}
    return reduce_stats(stats, lambda t, op: reduce_sum(t))


# ----------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class LayerActivity:
    """Unit activity of one layer (``nan`` fractions where a metric does not apply).

    Attributes:
        kind: ``"relu"``, ``"crelu"``, ``"leaky_relu"``, ``"gelu"``, ``"tanh"``, ``"sigmoid"``,
            ``"linear"`` or ``"conv2d"``.
        num_units: Output units ``U`` (0 for ``Linear``/``Conv2d``, which only report
            pre-activation statistics).
        num_pre_units: Pre-activation units ``U_in``.
        num_examples: Probe inputs ``n``.
        active_fraction: ``(U,)`` fraction of inputs on which each unit is non-zero.
        scores: ``(U,)`` ReDo scores ``s_i``.
        dead: ``(U,)`` bool mask of dead units.
        dormant: ``(U,)`` bool mask of tau-dormant units (``s_i <= tau``).
        rare: ``(U,)`` bool mask of rarely active units (``active_fraction < rare_fraction``).
        linearized: ``(U_in,)`` bool mask of linearized (pre-activation) units.
        saturated: ``(U,)`` bool mask of saturated units.
        num_dead, num_dormant, num_rare, num_linearized, num_saturated: Counts of the masks.
        dead_fraction, dormant_fraction, rare_fraction, linearized_fraction,
            saturated_fraction: Counts over ``U`` (``U_in`` for linearized); ``nan`` where the
            metric does not apply to ``kind``.
        activation_mean, activation_std: Mean and std of ``h`` over inputs, positions, units.
        preactivation_mean, preactivation_std: The same for the pre-activation.
    """

    kind: str
    num_units: int
    num_pre_units: int
    num_examples: int
    active_fraction: Tensor
    scores: Tensor
    dead: Tensor
    dormant: Tensor
    rare: Tensor
    linearized: Tensor
    saturated: Tensor
    num_dead: int
    num_dormant: int
    num_rare: int
    num_linearized: int
    num_saturated: int
    dead_fraction: float
    dormant_fraction: float
    rare_fraction: float
    linearized_fraction: float
    saturated_fraction: float
    activation_mean: float
    activation_std: float
    preactivation_mean: float
    preactivation_std: float


_METRICS = ("dead", "dormant", "rare", "linearized", "saturated")


@dataclass(frozen=True)
class UnitActivity:
    """Unit activity of every recorded layer and pooled over layers.

    The overall fractions pool the units of the layers where the metric applies: dead and rare
    over ReLU/CReLU layers, dormant over all activation layers, linearized over
    ReLU/CReLU/LeakyReLU/GELU layers (pre-activation units), saturated over Tanh/Sigmoid layers;
    ``nan`` if there is no such layer.

    Attributes:
        layers: Module name -> :class:`LayerActivity`, in forward order.
        num_dead, num_dormant, num_rare, num_linearized, num_saturated: Totals.
        dead_fraction, dormant_fraction, rare_fraction, linearized_fraction,
            saturated_fraction: Totals over the pooled unit counts.
        tau: The dormancy threshold used.
        rare_threshold: The ``rare_fraction`` threshold used.
    """

    layers: dict[str, LayerActivity]
    num_dead: int
    num_dormant: int
    num_rare: int
    num_linearized: int
    num_saturated: int
    dead_fraction: float
    dormant_fraction: float
    rare_fraction: float
    linearized_fraction: float
    saturated_fraction: float
    tau: float
    rare_threshold: float

    def scalars(self, per_layer: bool = True, layer_first: bool = False) -> dict[str, float]:
        """Flat ``name -> float`` for logging, without ``nan`` entries.

        Keys are ``"dead_fraction"``, ... for the totals and ``"dead_fraction/<layer>"``,
        ``"preactivation_std/<layer>"``, ... per layer (``"<layer>/dead_fraction"`` with
        ``layer_first``, the callback's layout).

        Example::

            >>> import torch
            >>> from torch import nn
            >>> from lightning_plasticity.measures.unit_activity import unit_activity
            >>> _ = torch.manual_seed(0)
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
            >>> with torch.no_grad():
            ...     _ = model[0].bias[:2].fill_(-100.0)  # two units dead on every input
            >>> result = unit_activity(model, torch.randn(64, 4), tau=0.0)
            >>> logged = {f"units/{k}": v for k, v in result.scalars().items()}
            >>> logged["units/dead_fraction"], logged["units/num_dead"]
            (0.25, 2.0)
            >>> sorted(k for k in logged if k.endswith("/1"))[:3]
            ['units/activation_mean/1', 'units/activation_std/1', 'units/dead_fraction/1']
            >>> # in a LightningModule or Callback hook: pl_module.log_dict(logged)
        """
        out: dict[str, float] = {}
        for m in _METRICS:
            out[f"{m}_fraction"] = getattr(self, f"{m}_fraction")
            out[f"num_{m}"] = float(getattr(self, f"num_{m}"))
        if per_layer:
            for name, layer in self.layers.items():
                def put(key: str, value: float, name: str = name) -> None:
                    out[f"{name}/{key}" if layer_first else f"{key}/{name}"] = value

                for m in _METRICS:
                    put(f"{m}_fraction", getattr(layer, f"{m}_fraction"))
                for key in ("activation_mean", "activation_std"):
                    if layer.num_units:
                        put(key, getattr(layer, key))
                put("preactivation_mean", layer.preactivation_mean)
                put("preactivation_std", layer.preactivation_std)
        return {k: v for k, v in out.items() if not math.isnan(v)}


def _mean_std(total: Tensor, sq_total: Tensor, count: float) -> tuple[float, float]:
    if count <= 0:
        return math.nan, math.nan
    mean = float(total) / count
    var = max(float(sq_total) / count - mean * mean, 0.0)
    return mean, math.sqrt(var)


def _layer_metrics(s: LayerActivityStats, tau: float, rare_fraction: float) -> LayerActivity:
    n = float(s.num_examples)
    U = s.active_count.numel()
    U_in = s.pre_positive_count.numel()
    dev = s.active_count.device
    if n > 0 and U > 0:
        active_fraction = s.active_count / n
        mean_abs = s.abs_mean_sum / n
        layer_mean = mean_abs.mean()
        scores = mean_abs / layer_mean if layer_mean > 0 else torch.zeros_like(mean_abs)
    else:
        active_fraction = torch.full((U,), math.nan, dtype=torch.float64, device=dev)
        scores = torch.zeros(U, dtype=torch.float64, device=dev)
    no = torch.zeros(U, dtype=torch.bool, device=dev)
    applies = {
        "dead": s.kind in _DEAD_KINDS,
        "rare": s.kind in _DEAD_KINDS,
        "dormant": s.kind in _ACTIVATION_KINDS,
        "linearized": s.kind in _LINEARIZED_KINDS,
        "saturated": s.kind in _SATURATING_KINDS,
    }
    masks = {
        "dead": s.active_count == 0 if applies["dead"] else no,
        "rare": active_fraction < rare_fraction if applies["rare"] else no,
        "dormant": scores <= tau if applies["dormant"] else no,
        "linearized": (
            (s.pre_positive_count == n) & (n > 0)
            if applies["linearized"]
            else torch.zeros(U_in, dtype=torch.bool, device=dev)
        ),
        "saturated": (s.saturated_count == n) & (n > 0) if applies["saturated"] else no,
    }
    counts = {m: int(masks[m].sum()) for m in _METRICS}
    sizes = {m: (U_in if m == "linearized" else U) for m in _METRICS}
    fractions = {
        m: counts[m] / sizes[m] if applies[m] and sizes[m] > 0 else math.nan for m in _METRICS
    }
    act_mean, act_std = _mean_std(s.sum.sum(), s.sq_sum.sum(), float(s.num_values) * U)
    pre_mean, pre_std = _mean_std(
        s.pre_sum.sum(), s.pre_sq_sum.sum(), float(s.num_pre_values) * U_in
    )
    return LayerActivity(
        kind=s.kind,
        num_units=U,
        num_pre_units=U_in,
        num_examples=int(n),
        active_fraction=active_fraction,
        scores=scores,
        dead=masks["dead"],
        dormant=masks["dormant"],
        rare=masks["rare"],
        linearized=masks["linearized"],
        saturated=masks["saturated"],
        num_dead=counts["dead"],
        num_dormant=counts["dormant"],
        num_rare=counts["rare"],
        num_linearized=counts["linearized"],
        num_saturated=counts["saturated"],
        dead_fraction=fractions["dead"],
        dormant_fraction=fractions["dormant"],
        rare_fraction=fractions["rare"],
        linearized_fraction=fractions["linearized"],
        saturated_fraction=fractions["saturated"],
        activation_mean=act_mean,
        activation_std=act_std,
        preactivation_mean=pre_mean,
        preactivation_std=pre_std,
    )


def _check_thresholds(tau: float, rare_fraction: float) -> None:
    if tau < 0:
        raise ValueError(f"tau must be nonnegative, got {tau} (Sokar et al. use 0.025 or 0.1).")
    if not 0 <= rare_fraction <= 1:
        raise ValueError(f"rare_fraction must be in [0, 1], got {rare_fraction} (e.g. 0.01).")


def unit_activity_from_stats(
    stats: dict[str, LayerActivityStats], *, tau: float = 0.025, rare_fraction: float = 0.01
) -> UnitActivity:
    """Turn (possibly summed across ranks) statistics into unit-activity metrics.

    Args:
        stats: From :func:`unit_activity_stats` / :func:`reduce_unit_activity_stats`.
        tau: ReDo dormancy threshold, ``s_i <= tau`` (0: dormant = zero on every input;
            Sokar et al. use 0.025 and 0.1).
        rare_fraction: A unit active on fewer than this fraction of inputs is rarely active.

    Returns:
        A :class:`UnitActivity`.

    Raises:
        ValueError: If ``tau`` is negative or ``rare_fraction`` is not in ``[0, 1]``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_plasticity.measures.unit_activity import (
        ...     unit_activity_from_stats, unit_activity_stats)
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
        >>> with torch.no_grad():
        ...     _ = model[0].bias[:2].fill_(-100.0)  # two units dead on every input
        >>> x = torch.randn(64, 4)
        >>> result = unit_activity_from_stats(unit_activity_stats(model, x), tau=0.0)
        >>> result.layers["1"].dead  # bool mask of dead units of module "1"
        tensor([ True,  True, False, False, False, False, False, False])
    """
    _check_thresholds(tau, rare_fraction)
    layers = {name: _layer_metrics(s, tau, rare_fraction) for name, s in stats.items()}
    kinds = {
        "dead": _DEAD_KINDS,
        "rare": _DEAD_KINDS,
        "dormant": _ACTIVATION_KINDS,
        "linearized": _LINEARIZED_KINDS,
        "saturated": _SATURATING_KINDS,
    }
    totals: dict[str, Any] = {}
    for m in _METRICS:
        pooled = [la for la in layers.values() if la.kind in kinds[m]]
        size = sum(la.num_pre_units if m == "linearized" else la.num_units for la in pooled)
        count = sum(getattr(la, f"num_{m}") for la in pooled)
        totals[f"num_{m}"] = count
        totals[f"{m}_fraction"] = count / size if size > 0 else math.nan
    return UnitActivity(layers=layers, tau=tau, rare_threshold=rare_fraction, **totals)


def unit_activity(
    model: nn.Module,
    inputs: Any,
    layers: list[str] | tuple[str, ...] | None = None,
    *,
    tau: float = 0.025,
    rare_fraction: float = 0.01,
    saturation_threshold: float = 0.99,
    reduce_sum: ReduceSum | None = None,
) -> UnitActivity:
    """Dead, dormant, rarely active, linearized and saturated units of a model on a batch.

    See the module docstring for the definitions. With ``reduce_sum`` (DDP: each rank passes
    its shard of the probe batch) the sufficient statistics are summed across ranks before the
    metrics are computed, so every rank gets the single-process result on the whole batch.

    Args:
        model: The model (normally in eval mode; not modified).
        inputs: The probe inputs (this rank's shard under DDP).
        layers: Optional fnmatch patterns on module names.
        tau: ReDo dormancy threshold (``s_i <= tau``).
        rare_fraction: Activity fraction below which a unit is rarely active.
        saturation_threshold: Tanh/sigmoid saturation level.
        reduce_sum: Sums a tensor across ranks, or ``None`` for a single process.

    Returns:
        A :class:`UnitActivity`.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_plasticity.measures.unit_activity import unit_activity
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
        >>> with torch.no_grad():
        ...     _ = model[0].bias[:2].fill_(-100.0)  # two units dead on every input
        >>> result = unit_activity(model, torch.randn(64, 4), tau=0.0)
        >>> result.dead_fraction, result.layers["1"].num_dead
        (0.25, 2)
    """
    _check_thresholds(tau, rare_fraction)  # before any collective
    stats = unit_activity_stats(model, inputs, layers, saturation_threshold=saturation_threshold)
    if reduce_sum is not None:
        stats = reduce_unit_activity_stats(stats, reduce_sum)
    return unit_activity_from_stats(stats, tau=tau, rare_fraction=rare_fraction)
