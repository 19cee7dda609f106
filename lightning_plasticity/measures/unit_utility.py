"""Per-unit statistics and unit surgery for the unit-level interventions (ReDo, continual backprop).

Pure PyTorch, no Lightning import. Three parts:

* **Statistics**: the mean absolute activation of every unit, Sokar et al.'s dormancy score,
  Dohare et al.'s contribution utility with its exponential moving average and bias correction,
  and the choice of which units to replace.
* **Structure**: :func:`find_unit_layers` finds the hidden layers whose units can be replaced, as
  :class:`UnitLayer` s: an incoming layer (``Linear``/``Conv``) whose output rows are the units, an
  optional per-unit norm, the activation, and the outgoing layer that reads the units.
* **Surgery**: :func:`fresh_initialization` (a freshly initialised copy of a module drawn from a
  seed, without touching the global RNG streams), :func:`reinitialize_units` (incoming rows from a
  fresh initialisation, outgoing columns zeroed) and the :class:`ParamEntries` it wrote, which the
  callbacks hand to :func:`~lightning_plasticity.callbacks.optimizer_state.reset_state_entries`.

A *unit* is one output row of the incoming layer (a neuron of a ``Linear``, a channel of a
``Conv``). An activation that widens its input (``CReLU``: ``cat(relu(x), relu(-x))``) gives each
unit ``multiplier`` copies in the activation output, at positions ``i + k * num_units``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "ParamEntries",
    "UnitLayer",
    "bias_corrected",
    "contribution_utility",
    "dormant_scores",
    "dormant_units",
    "ema_update",
    "find_unit_layers",
    "fresh_initialization",
    "lowest_utility_units",
    "reinitialize_incoming",
    "reinitialize_units",
    "replacement_count",
    "unit_activity",
    "zero_outgoing",
]

# ------------------------------------------------------------------------------- statistics


def unit_activity(activation: Tensor, unit_dim: int = 1) -> Tensor:
    """Mean absolute activation of every unit: ``a_i = E|h_i|``.

    The expectation is over every dimension except ``unit_dim`` (the batch, and the spatial
    positions of a convolutional feature map or the tokens of a sequence), in float32 or wider.

    Args:
        activation: Activations, e.g. ``(N, D)``, ``(N, C, H, W)`` or ``(N, T, D)``.
        unit_dim: The dimension that indexes units (``1`` for ``(N, D)`` and ``(N, C, H, W)``,
            ``-1`` for tokens).

    Returns:
        A 1-D tensor of ``activation.shape[unit_dim]`` entries.

    Example::

        >>> unit_activity(torch.tensor([[1.0, -2.0, 0.0], [3.0, 2.0, 0.0]]))
        tensor([2., 2., 0.])
    """
    h = activation.detach()
    if not h.is_floating_point() or h.dtype in (torch.float16, torch.bfloat16):
        h = h.float()
    return h.abs().movedim(unit_dim, 0).reshape(h.shape[unit_dim], -1).mean(dim=1)


def dormant_scores(activity: Tensor) -> Tensor:
    """Sokar et al.'s normalised activity ``s_i = a_i / ((1/K) sum_k a_k)`` of the K units.

    From "The Dormant Neuron Phenomenon in Deep Reinforcement Learning" (Sokar, Agarwal, Castro
    and Evci, ICML 2023), with ``a_i = E|h_i|`` from :func:`unit_activity`. A layer whose units
    are all exactly zero has scores of zero (every unit dormant) rather than ``0/0``.

    Args:
        activity: ``a``, one entry per unit of one layer.

    Returns:
        ``s``, same shape.

    Example::

        >>> dormant_scores(torch.tensor([2.0, 2.0, 0.0, 0.0]))
        tensor([2., 2., 0., 0.])
    """
    mean = activity.mean()
    if mean <= 0:
        return torch.zeros_like(activity)
    return activity / mean


def dormant_units(activity: Tensor, tau: float, multiplier: int = 1) -> Tensor:
    """Which units are tau-dormant: ``s_i <= tau`` (Sokar et al., 2023).

    ``tau = 0`` selects the units that are exactly zero on every input (dead ReLUs); Sokar et al.
    recycle with small positive thresholds such as ``0.025``. With ``multiplier > 1`` (CReLU) the
    scores are taken over the ``multiplier * num_units`` activation outputs and a unit is dormant
    when all its copies are.

    Args:
        activity: ``a``, ``multiplier * num_units`` entries (activation outputs).
        tau: The threshold, ``>= 0``.
        multiplier: Activation outputs per unit.

    Returns:
        A boolean mask of ``num_units`` entries.

    Example::

        >>> dormant_units(torch.tensor([1.0, 0.01, 0.0, 2.99]), tau=0.025)
        tensor([False,  True,  True, False])
    """
    if tau < 0:
        raise ValueError(f"dormant_units: tau must be >= 0, got {tau}.")
    mask = dormant_scores(activity) <= tau
    return mask.reshape(multiplier, -1).all(dim=0)


def contribution_utility(activity: Tensor, outgoing_magnitude: Tensor,
                         multiplier: int = 1) -> Tensor:
    """Dohare et al.'s contribution utility of every unit on one batch.

    ``u_i = E|h_i| * sum_k |w_ki|``: how much unit ``i`` contributes to the next layer, where
    ``w_ki`` are its outgoing weights (Dohare, Hernandez-Garcia, Lan, Rahman, Mahmood and Sutton,
    "Loss of plasticity in deep continual learning", Nature 2024). Their reference code uses the
    mean instead of the sum over ``k``; within a layer, where units are compared, the two rank
    units identically. With ``multiplier > 1`` (CReLU) the copies' contributions are added.

    Args:
        activity: ``E|h|`` per activation output, ``multiplier * num_units`` entries.
        outgoing_magnitude: ``sum_k |w_k.|`` per activation output, same shape (see
            :meth:`UnitLayer.outgoing_magnitude`).
        multiplier: Activation outputs per unit.

    Returns:
        ``num_units`` utilities.

    Example::

        >>> contribution_utility(torch.tensor([1.0, 0.5]), torch.tensor([2.0, 4.0]))
        tensor([2., 2.])
    """
    return (activity * outgoing_magnitude).reshape(multiplier, -1).sum(dim=0)


def ema_update(average: Tensor, value: Tensor, decay: float) -> Tensor:
    """One step of an exponential moving average: ``decay * average + (1 - decay) * value``.

    Started from zero, after ``a`` steps it is biased towards zero by the factor ``1 - decay**a``,
    which :func:`bias_corrected` removes.
    """
    return decay * average + (1.0 - decay) * value


def bias_corrected(average: Tensor, ages: Tensor, decay: float) -> Tensor:
    """Bias-corrected moving average ``u_hat = u / (1 - decay**a)`` (zero where ``a = 0``).

    Dohare et al. (Nature 2024) correct each unit's utility with its own age ``a_i``, the number
    of moving-average updates since the unit was (re)initialised, as Adam corrects its moments.
    A value that stayed ``x`` for ``a`` updates has ``u_hat = x`` exactly.

    Args:
        average: ``u`` per unit.
        ages: ``a`` per unit (integers ``>= 0``).
        decay: The moving-average decay ``eta`` in ``[0, 1)``.

    Returns:
        ``u_hat`` per unit.

    Example::

        >>> u = ema_update(ema_update(torch.zeros(1), torch.ones(1), 0.9), torch.ones(1), 0.9)
        >>> torch.allclose(bias_corrected(u, torch.tensor([2]), 0.9), torch.ones(1))
        True
    """
    correction = 1.0 - torch.pow(torch.full_like(average, decay), ages.to(average.dtype))
    return torch.where(ages > 0, average / correction.clamp_min(torch.finfo(average.dtype).tiny),
                       torch.zeros_like(average))


def replacement_count(budget: float, replacement_rate: float, num_mature: int,
                      num_units: int) -> tuple[int, float]:
    """How many units continual backprop replaces in one layer at one step, and the new budget.

    The budget grows by ``replacement_rate * num_mature`` per step (nothing while no unit is
    mature) and ``floor(budget)`` units are replaced, but never more than ``num_mature`` and never
    all ``num_units`` units of the layer at once. The whole part of the budget is spent either
    way, so a capped step does not build up a backlog; the fractional part carries over.

    Args:
        budget: The layer's accumulated fractional budget.
        replacement_rate: Replacements per mature unit per step (Dohare et al.'s ``rho``).
        num_mature: Units older than the maturity threshold.
        num_units: Units of the layer.

    Returns:
        ``(count, new_budget)``.

    Example::

        >>> replacement_count(0.5, 0.01, 100, 128)
        (1, 0.5)
    """
    budget = budget + replacement_rate * num_mature
    whole = math.floor(budget)
    count = max(0, min(whole, num_mature, num_units - 1))
    return count, budget - whole


def lowest_utility_units(utility: Tensor, eligible: Tensor, count: int) -> Tensor:
    """The ``count`` eligible units of lowest utility (ties: lower index first).

    Args:
        utility: Utility per unit.
        eligible: Boolean mask of the units that may be chosen (the mature ones).
        count: How many to choose; at most ``eligible.sum()``.

    Returns:
        Sorted indices (``int64``).
    """
    count = min(count, int(eligible.sum()))
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=utility.device)
    masked = torch.where(eligible, utility, torch.full_like(utility, math.inf))
    chosen = torch.sort(masked, stable=True).indices[:count]
    return chosen.sort().values


# ------------------------------------------------------------------------------- structure

_IN_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
               nn.Identity)
_ACT_TYPES = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SELU, nn.SiLU,
              nn.Mish, nn.Softplus, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.CELU)
_PASS_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity, nn.MaxPool1d,
               nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.Flatten)

#: What :func:`find_unit_layers` recognises by itself (for the docs and error messages).
SUPPORTED_ARCHITECTURES = (
    "the package's MLP (every hidden layer), CNN (every conv block and the hidden Linear) and "
    "ResNet18 (the inner conv1 -> bn1 -> act1 -> conv2 of every residual block; units on the "
    "residual stream are left alone), and Linear/Conv -> [norm] -> activation -> [dropout, "
    "pooling, flatten] -> Linear/Conv chains inside any nn.Sequential (this covers the ViT's "
    "mlp.fc1 -> act -> fc2)"
)


def _is_class(module: nn.Module, module_path: str, name: str) -> bool:
    # The package's networks are recognised by name: importing them would import Lightning.
    return any(c.__name__ == name and c.__module__ == module_path for c in type(module).__mro__)


def _is_activation(module: nn.Module) -> bool:
    return isinstance(module, _ACT_TYPES) or type(module).__name__ == "CReLU"


@dataclass(frozen=True)
class ParamEntries:
    """Entries ``index`` along dimension ``dim`` of a parameter (rows, columns or channels)."""

    param: nn.Parameter
    dim: int
    index: Tensor


@dataclass(frozen=True)
class UnitLayer:
    """A hidden layer whose units can be measured and replaced.

    Attributes:
        name: The incoming layer's name (used as the layer's key).
        incoming: The ``Linear``/``Conv`` whose output rows (channels) are the units.
        norm: A per-unit norm between ``incoming`` and ``activation``, or ``None``.
        activation: The activation module; forward hooks read the units from its output.
        outgoing: The ``Linear``/``Conv`` that reads the activation (after any dropout,
            pooling or flattening).
        names: ``(incoming, norm or "", activation, outgoing)`` module names.
        multiplier: Activation outputs per unit (2 for CReLU, else 1).
        group: Outgoing input columns per activation output: 1, or ``H * W`` when a conv
            feature map is flattened (channel-major) into a ``Linear``.
    """

    name: str
    incoming: nn.Module
    norm: nn.Module | None
    activation: nn.Module
    outgoing: nn.Module
    names: tuple[str, str, str, str]
    multiplier: int = 1
    group: int = 1

    @property
    def num_units(self) -> int:
        inc = self.incoming
        return inc.out_features if isinstance(inc, nn.Linear) else inc.out_channels

    @property
    def unit_dim(self) -> int:
        """The units' dimension in the activation output (``-1`` after a Linear, else 1)."""
        return -1 if isinstance(self.incoming, nn.Linear) else 1

    def outgoing_columns(self, units: Tensor) -> Tensor:
        """Indices along ``outgoing.weight``'s dimension 1 that read the given units."""
        units = units.to(self.outgoing.weight.device, torch.long)
        copies = (units[None, :] + self.num_units *
                  torch.arange(self.multiplier, device=units.device)[:, None]).reshape(-1)
        cols = (copies[:, None] * self.group +
                torch.arange(self.group, device=units.device)[None, :]).reshape(-1)
        return cols.sort().values

    def outgoing_magnitude(self) -> Tensor:
        """``sum_k |w_k.|`` per activation output (over output units and kernel positions)."""
        w = self.outgoing.weight.detach().abs()
        per_column = w.transpose(0, 1).reshape(w.shape[1], -1).sum(dim=1)
        return per_column.reshape(-1, self.group).sum(dim=1).float()


def _norm_ok(norm: nn.Module, width: int) -> bool:
    if isinstance(norm, nn.Identity):
        return True
    if not isinstance(norm, _NORM_TYPES):
        return False
    tensors = list(norm.parameters(recurse=False)) + [
        b for n, b in norm.named_buffers(recurse=False) if n != "num_batches_tracked"]
    if isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) != (width,):
        return False
    if isinstance(norm, nn.GroupNorm) and norm.num_channels != width:
        return False
    return all(t.shape == (width,) for t in tensors)


def _make_layer(root: nn.Module, names: Sequence[str]) -> UnitLayer:
    modules = dict(root.named_modules())
    missing = [n for n in names if n and n not in modules]
    if missing:
        raise ValueError(f"unit layer {tuple(names)}: no module named {missing}; module names "
                         f"look like {[n for n in list(modules)[1:13]]}.")
    if len(names) == 3:
        in_name, act_name, out_name = names
        norm_name = ""
    elif len(names) == 4:
        in_name, norm_name, act_name, out_name = names
    else:
        raise ValueError(f"a unit layer is (incoming, activation, outgoing) or (incoming, norm, "
                         f"activation, outgoing) module names; got {tuple(names)}.")
    inc, act, out = modules[in_name], modules[act_name], modules[out_name]
    norm = modules[norm_name] if norm_name else None
    label = f"unit layer {in_name!r} -> {out_name!r}"
    for role, m in (("incoming", inc), ("outgoing", out)):
        if not isinstance(m, _IN_TYPES):
            raise ValueError(f"{label}: the {role} module must be a Linear or Conv, got "
                             f"{type(m).__name__}.")
        if parametrize.is_parametrized(m):
            raise ValueError(f"{label}: parametrized layers (e.g. spectral_norm) are not "
                             "supported; their weights are computed from other tensors.")
    if isinstance(out, nn.Module) and not isinstance(out, nn.Linear) and out.groups != 1:
        raise ValueError(f"{label}: grouped convolutions are not supported as outgoing layers.")
    width = inc.out_features if isinstance(inc, nn.Linear) else inc.out_channels
    if norm is not None and not _norm_ok(norm, width):
        raise ValueError(f"{label}: the norm {norm_name!r} ({type(norm).__name__}) is not a "
                         f"per-unit norm over {width} units.")
    multiplier = 2 if type(act).__name__ == "CReLU" else 1
    fan_in = out.in_features if isinstance(out, nn.Linear) else out.in_channels
    per_output, rem = divmod(fan_in, width * multiplier)
    linear_in = isinstance(inc, nn.Linear)
    if rem or per_output < 1 or (per_output != 1 and (linear_in or not isinstance(out, nn.Linear))):
        raise ValueError(f"{label}: {width} units (x{multiplier} after the activation) do not "
                         f"match the outgoing layer's {fan_in} inputs.")
    return UnitLayer(in_name, inc, norm, act, out, (in_name, norm_name, act_name, out_name),
                     multiplier, per_output)


def _auto_names(root: nn.Module) -> list[tuple[str, str, str, str]]:
    found: list[tuple[str, str, str, str]] = []
    for prefix, m in root.named_modules():
        p = f"{prefix}." if prefix else ""
        if _is_class(m, "lightning_plasticity.models.mlp", "MLP"):
            n = len(m.layers)
            for i in range(n):
                out = f"{p}layers.{i + 1}.linear" if i + 1 < n else f"{p}head"
                found.append((f"{p}layers.{i}.linear", f"{p}layers.{i}.norm",
                              f"{p}layers.{i}.act", out))
        elif _is_class(m, "lightning_plasticity.models.cnn", "CNN"):
            n = len(m.blocks)
            for i in range(n):
                out = f"{p}blocks.{i + 1}.conv" if i + 1 < n else f"{p}fc.linear"
                found.append((f"{p}blocks.{i}.conv", f"{p}blocks.{i}.norm",
                              f"{p}blocks.{i}.act", out))
            found.append((f"{p}fc.linear", f"{p}fc.norm", f"{p}fc.act", f"{p}head"))
        elif _is_class(m, "lightning_plasticity.models.resnet", "BasicBlock"):
            found.append((f"{p}conv1", f"{p}bn1", f"{p}act1", f"{p}conv2"))
        elif isinstance(m, nn.Sequential):
            found.extend(_sequential_names(m, p))
    return found


def _sequential_names(seq: nn.Sequential, prefix: str) -> list[tuple[str, str, str, str]]:
    # _modules, not named_children(): a module used twice must be seen twice.
    children = [(n, m) for n, m in seq._modules.items() if m is not None]
    found = []
    for i, (in_name, inc) in enumerate(children):
        if not isinstance(inc, _IN_TYPES):
            continue
        j, norm_name = i + 1, ""
        if j < len(children) and isinstance(children[j][1], _NORM_TYPES) \
                and not _is_activation(children[j][1]):
            norm_name, j = children[j][0], j + 1
        if j >= len(children) or not _is_activation(children[j][1]):
            continue
        act_name, j = children[j][0], j + 1
        while j < len(children) and isinstance(children[j][1], _PASS_TYPES):
            j += 1
        if j < len(children) and isinstance(children[j][1], _IN_TYPES):
            found.append((prefix + in_name, prefix + norm_name if norm_name else "",
                          prefix + act_name, prefix + children[j][0]))
    return found


def find_unit_layers(root: nn.Module,
                     layers: Sequence[Sequence[str]] | None = None) -> list[UnitLayer]:
    """The hidden layers of ``root`` whose units can be measured and replaced.

    Found automatically in the package's ``MLP`` (every hidden layer), ``CNN`` (every conv block
    and the hidden Linear) and ``ResNet18`` (the inner ``conv1 -> bn1 -> act1 -> conv2`` of every
    residual block; units on the residual stream are left alone), and in ``Linear``/``Conv`` ->
    [norm] -> activation -> [dropout, pooling, flatten] -> ``Linear``/``Conv`` chains among the
    children of any ``nn.Sequential`` (this covers the ``ViT``'s ``mlp.fc1 -> act -> fc2``).
    Other structures, residual ones in particular, are not guessed: name their layers
    explicitly, ``layers=[("net.0", "net.1", "net.2")]`` or, with a per-unit norm
    (BatchNorm, LayerNorm over the units, GroupNorm, Identity) in between,
    ``[("fc1", "norm1", "act1", "fc2")]``. The caller then vouches that the activation's output
    reaches the outgoing layer unchanged except for dropout, pooling or channel-major flattening,
    and reaches nothing else (no residual connection).

    Args:
        root: The model (a LightningModule or a network); names are relative to it.
        layers: Explicit ``(incoming, [norm,] activation, outgoing)`` name tuples, or ``None``.

    Returns:
        The layers, in module order.

    Raises:
        ValueError: If a name is unknown, a structure does not fit (sizes, parametrized or
            grouped layers, a norm that is not per-unit, an activation module used in more
            than one place), or nothing is found; the message says what to pass instead.
    """
    if layers is not None:
        names = [tuple(t) for t in layers]
        if not names:
            raise ValueError("layers must name at least one unit layer, or be None.")
    else:
        names = _auto_names(root)
        if not names:
            raise ValueError(
                f"Found no hidden layer to work on in {type(root).__name__}. Supported "
                f"automatically: {SUPPORTED_ARCHITECTURES}. For other architectures pass "
                "layers=[(incoming, activation, outgoing), ...] with module names, for "
                "layers with no residual connection.")
    uses: dict[int, int] = {}
    for _, m in root.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    result = []
    for n in dict.fromkeys(names):
        layer = _make_layer(root, n)
        if uses.get(id(layer.activation), 0) > 1:
            raise ValueError(
                f"The activation module {layer.names[2]!r} of unit layer {layer.name!r} is "
                "shared with another place in the model; forward hooks cannot tell its calls "
                "apart. Use one activation module per layer.")
        result.append(layer)
    return result


# ------------------------------------------------------------------------------- surgery


def fresh_initialization(module: nn.Module, seed: int) -> nn.Module:
    """A deep copy of ``module`` with every submodule's ``reset_parameters()`` called.

    The draws come from the global generators re-seeded with ``seed`` inside
    :func:`torch.random.fork_rng`, so the same ``seed`` gives the same values and the caller's
    RNG streams (CPU, and the CUDA devices holding the module) are left exactly as they were.
    The copy has the original's initialisation scheme, e.g. PyTorch's Kaiming-uniform default
    for ``Linear``/``Conv`` and ones/zeros for norms (BatchNorm's running statistics reset too).
    Parameters of modules without ``reset_parameters`` keep the original's values.

    Args:
        module: The module to copy (left unchanged).
        seed: The seed of the draws.

    Returns:
        The fresh copy, on the original's devices.

    Example::

        >>> layer = nn.Linear(3, 2)
        >>> a, b = fresh_initialization(layer, 0), fresh_initialization(layer, 0)
        >>> torch.equal(a.weight, b.weight)
        True
    """
    devices = sorted({t.device.index if t.device.index is not None else
                      torch.cuda.current_device()
                      for t in module.parameters() if t.is_cuda})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        # Seed only the generators in use: torch.manual_seed would queue a lazy re-seed of
        # CUDA devices that are not initialised yet, which would run after the fork ends.
        torch.default_generator.manual_seed(seed)
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(seed)
        fresh = copy.deepcopy(module)
        for m in fresh.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    return fresh


@torch.no_grad()
def reinitialize_incoming(layer: UnitLayer, units: Tensor, seed: int) -> list[ParamEntries]:
    """Redraw the units' incoming weights from a fresh initialisation of the layer.

    The units' rows of ``layer.incoming``'s weight and their bias entries, and their entries of
    the norm's per-unit affine parameters and running statistics, are copied from
    :func:`fresh_initialization` of those modules with ``seed`` (the norm with ``seed + 1``).

    Args:
        layer: The layer.
        units: Indices of the units.
        seed: Seed of the fresh initialisation.

    Returns:
        The parameter entries written.
    """
    touched: list[ParamEntries] = []
    if units.numel() == 0:
        return touched
    for k, module in enumerate((layer.incoming, layer.norm)):
        if module is None or isinstance(module, nn.Identity):
            continue
        fresh = fresh_initialization(module, seed + k)
        fresh_tensors = dict(fresh.named_parameters(recurse=False))
        fresh_tensors.update(fresh.named_buffers(recurse=False))
        for name, t in [*module.named_parameters(recurse=False),
                        *module.named_buffers(recurse=False)]:
            if name == "num_batches_tracked" or t.dim() == 0:
                continue
            idx = units.to(t.device, torch.long)
            t.index_copy_(0, idx, fresh_tensors[name].index_select(0, idx).to(t.dtype))
            if isinstance(t, nn.Parameter):
                touched.append(ParamEntries(t, 0, idx))
    return touched


@torch.no_grad()
def zero_outgoing(layer: UnitLayer, units: Tensor) -> list[ParamEntries]:
    """Set the units' outgoing weights (every column of ``layer.outgoing`` reading a copy of
    a unit) to zero, so that the units do not change the network's output.

    Returns:
        The parameter entries written.
    """
    if units.numel() == 0:
        return []
    w = layer.outgoing.weight
    cols = layer.outgoing_columns(units)
    w.index_fill_(1, cols, 0.0)
    return [ParamEntries(w, 1, cols)]


def reinitialize_units(layers: Sequence[UnitLayer], units: Sequence[Tensor],
                       seeds: Sequence[int]) -> list[ParamEntries]:
    """Replace units of several layers: fresh incoming weights, zero outgoing weights.

    First :func:`reinitialize_incoming` for every layer, then :func:`zero_outgoing` for every
    layer, so that when the outgoing layer of one layer is the incoming layer of the next, the
    replaced units' outgoing weights are exactly zero afterwards (also towards replaced units of
    the next layer). The replaced units then do not change the network's output until they have
    learned something (Sokar et al., 2023; Dohare et al., 2024). Nothing else is written: the
    outgoing bias and all other rows and columns stay bit-identical.

    Args:
        layers: The layers.
        units: Indices of the units to replace, one tensor per layer.
        seeds: Seed of each layer's fresh initialisation.

    Returns:
        The parameter entries written, for resetting the optimizer state of exactly those.
    """
    touched: list[ParamEntries] = []
    for layer, u, seed in zip(layers, units, seeds):
        touched += reinitialize_incoming(layer, u, seed)
    for layer, u in zip(layers, units):
        touched += zero_outgoing(layer, u)
    return touched
