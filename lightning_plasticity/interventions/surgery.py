"""Unit layers and unit surgery for the unit-level interventions (ReDo, continual backprop).

Pure PyTorch, no Lightning import. Three parts:

* **Structure**: :func:`find_unit_layers` finds the hidden layers whose units can be replaced,
  as :class:`UnitLayer` s: an incoming layer (``Linear``/``Conv``) whose output rows are the
  units, an optional per-unit norm, the activation (a module, or ``None`` for a functional one
  such as ``F.relu``), and the outgoing layer that reads the units.
* **Activity**: :func:`unit_activity`, the mean absolute activation of every unit, and
  :meth:`UnitLayer.activity`, which reads it from a recorded call
  (:class:`~lightning_plasticity.core.record.LayerCall`) of the layer's *observed* module: the
  activation's output, or, for a functional activation, the outgoing layer's input.
* **Surgery**: :func:`reinitialize_units` (incoming rows from a fresh initialisation, outgoing
  columns zeroed) and the :class:`ParamEntries` it wrote, which the callbacks hand to
  :func:`~lightning_plasticity.interventions.optimizer_state.reset_touched`. Only trainable
  parameters (``requires_grad=True``) are ever written; a layer whose incoming or outgoing
  weight is frozen is left alone (see :meth:`UnitLayer.frozen`).

A *unit* is one output row of the incoming layer (a neuron of a ``Linear``, a channel of a
``Conv``). An activation that widens its input (``CReLU``: ``cat(relu(x), relu(-x))``) gives each
unit ``multiplier`` copies in the activation output, at positions ``i + k * num_units``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_plasticity.core.initialization import fresh_initialization
from lightning_plasticity.core.record import LayerCall

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ParamEntries",
    "UnitLayer",
    "find_unit_layers",
    "reinitialize_incoming",
    "reinitialize_units",
    "unit_activity",
    "zero_outgoing",
]


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

    Example:
        >>> import torch
        >>> unit_activity(torch.tensor([[1.0, -2.0, 0.0], [3.0, 2.0, 0.0]]))
        tensor([2., 2., 0.])
    """
    h = activation.detach()
    if not h.is_floating_point() or h.dtype in (torch.float16, torch.bfloat16):
        h = h.float()
    return h.abs().movedim(unit_dim, 0).reshape(h.shape[unit_dim], -1).mean(dim=1)


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
        activation: The activation module, or ``None`` for a functional activation
            (``F.relu``); then the units are read from the outgoing layer's input.
        outgoing: The ``Linear``/``Conv`` that reads the activation (after any dropout,
            pooling or flattening).
        names: ``(incoming, norm or "", activation or "", outgoing)`` module names.
        multiplier: Activation outputs per unit (2 for CReLU, else 1).
        group: Outgoing input columns per activation output: 1, or ``H * W`` when a conv
            feature map is flattened (channel-major) into a ``Linear``.
    """

    name: str
    incoming: nn.Module
    norm: nn.Module | None
    activation: nn.Module | None
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

    @property
    def observed_name(self) -> str:
        """The module whose calls show the units: the activation, else the outgoing layer."""
        return self.names[2] if self.activation is not None else self.names[3]

    @property
    def observed_module(self) -> nn.Module:
        return self.activation if self.activation is not None else self.outgoing

    def activity(self, call: LayerCall) -> Tensor | None:
        """``E|h|`` per activation output (``multiplier * num_units`` entries) from one call of
        :attr:`observed_module`: its output for an activation module, else the outgoing layer's
        input (a flattened conv feature map is averaged over the positions of each channel)."""
        if self.activation is not None:
            return unit_activity(call.output, self.unit_dim)
        x = call.input
        if x is None:
            return None
        if isinstance(self.outgoing, nn.Linear):
            return unit_activity(x, -1).reshape(-1, self.group).mean(dim=1)
        return unit_activity(x, 1)

    def frozen(self) -> str | None:
        """``"incoming"`` if the incoming weight is frozen (``requires_grad=False``): the units
        are not trained, so they are not replaced; ``"outgoing"`` if the outgoing weight is
        frozen: the outgoing weights cannot be zeroed, so replacing a unit would change the
        network's function; ``None`` if the units can be replaced."""
        if not self.incoming.weight.requires_grad:
            return "incoming"
        if not self.outgoing.weight.requires_grad:
            return "outgoing"
        return None

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
    norm_name = act_name = ""
    if len(names) == 2:
        in_name, out_name = names
    elif len(names) == 3:
        in_name, act_name, out_name = names
    elif len(names) == 4:
        in_name, norm_name, act_name, out_name = names
    else:
        raise ValueError(f"a unit layer is (incoming, outgoing), (incoming, activation, "
                         f"outgoing) or (incoming, norm, activation, outgoing) module names; got "
                         f"{tuple(names)}.")
    inc, out = modules[in_name], modules[out_name]
    act = modules[act_name] if act_name else None
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
    multiplier = 2 if act is not None and type(act).__name__ == "CReLU" else 1
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
    ``[("fc1", "norm1", "act1", "fc2")]``. With a functional activation (``F.relu`` in
    ``forward``: no module to hook), name only the two layers, ``[("fc1", "fc2")]``: the units are
    then read from the outgoing layer's input. The caller then vouches that the activation's
    output reaches the outgoing layer unchanged except for dropout, pooling or channel-major
    flattening, and reaches nothing else (no residual connection).

    Args:
        root: The model (a LightningModule or a network); names are relative to it.
        layers: Explicit ``(incoming, [[norm,] activation,] outgoing)`` name tuples, or
            ``None``.

    Returns:
        The layers, in module order.

    Raises:
        ValueError: If a name is unknown, a structure does not fit (sizes, parametrized or
            grouped layers, a norm that is not per-unit, an observed module used in more
            than one place), or nothing is found; the message says what to pass instead.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 2))
        >>> [(layer.name, layer.num_units, layer.observed_name) for layer in find_unit_layers(net)]
        [('0', 8, '1')]
        >>> [layer.observed_name for layer in find_unit_layers(net, [("0", "3")])]
        ['3']
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
                "layers=[(incoming, activation, outgoing), ...] with module names, or "
                "(incoming, outgoing) for a functional activation such as F.relu, for layers "
                "with no residual connection.")
    uses: dict[int, int] = {}
    for _, m in root.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    result: list[UnitLayer] = []
    observed: dict[str, str] = {}
    for n in dict.fromkeys(names):
        layer = _make_layer(root, n)
        what = "activation module" if layer.activation is not None else "outgoing module"
        if uses.get(id(layer.observed_module), 0) > 1:
            raise ValueError(
                f"The {what} {layer.observed_name!r} of unit layer {layer.name!r} is shared "
                "with another place in the model; forward hooks cannot tell its calls apart. "
                "Use one module per place.")
        if layer.observed_name in observed:
            raise ValueError(
                f"Unit layers {observed[layer.observed_name]!r} and {layer.name!r} are both "
                f"read from the module {layer.observed_name!r}; each unit layer needs its own.")
        observed[layer.observed_name] = layer.name
        result.append(layer)
    return result


# ------------------------------------------------------------------------------- surgery


def _all_trainable(module: nn.Module) -> bool:
    return all(p.requires_grad for p in module.parameters(recurse=False))


@torch.no_grad()
def reinitialize_incoming(layer: UnitLayer, units: Tensor, seed: int) -> list[ParamEntries]:
    """Redraw the units' incoming weights from a fresh initialisation of the layer.

    The units' rows of ``layer.incoming``'s weight and their bias entries, and their entries of
    the norm's per-unit affine parameters and running statistics, are copied from
    :func:`~lightning_plasticity.core.initialization.fresh_initialization` of those modules with
    ``seed`` (the norm with ``seed + 1``). Frozen parameters (``requires_grad=False``) are left
    alone, and so are the running statistics of a norm with a frozen parameter.

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
        targets = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if _all_trainable(module):
            targets += list(module.named_buffers(recurse=False))
        for name, t in targets:
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
        The parameter entries written (none if the outgoing weight is frozen).
    """
    w = layer.outgoing.weight
    if units.numel() == 0 or not w.requires_grad:
        return []
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
    outgoing bias and all other rows and columns stay bit-identical. Layers with a frozen
    incoming or outgoing weight (:meth:`UnitLayer.frozen`) are skipped.

    Args:
        layers: The layers.
        units: Indices of the units to replace, one tensor per layer.
        seeds: Seed of each layer's fresh initialisation.

    Returns:
        The parameter entries written, for resetting the optimizer state of exactly those.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> layers = find_unit_layers(net)
        >>> touched = reinitialize_units(layers, [torch.tensor([1, 3])], seeds=[0])
        >>> [(tuple(e.param.shape), e.dim, e.index.tolist()) for e in touched]
        [((4, 3), 0, [1, 3]), ((4,), 0, [1, 3]), ((2, 4), 1, [1, 3])]
        >>> net[2].weight[:, [1, 3]].abs().sum().item()
        0.0
    """
    chosen = [(layer, u, seed) for layer, u, seed in zip(layers, units, seeds)
              if layer.frozen() is None]
    touched: list[ParamEntries] = []
    for layer, u, seed in chosen:
        touched += reinitialize_incoming(layer, u, seed)
    for layer, u, _ in chosen:
        touched += zero_outgoing(layer, u)
    return touched
