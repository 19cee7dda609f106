"""One pass of any loss with forward hooks: what each layer saw and produced.

Measurements must not assume ``model(batch[0])``: users' modules may have no ``forward``, take
dict batches or ``forward(x, target)``. Instead the module's *own* loss runs once (a closure the
caller builds: ``loss_fn``, ``plasticity_loss`` or ``training_step``) and forward hooks record,
for every call of the chosen modules, its input and output. A layer's input is the features of
the units feeding it, whatever produced them (``nn.ReLU``, ``F.relu``, ``torch.relu``).

:class:`HeadOutput` turns that into an ``nn.Module``: ``HeadOutput(module, loss_fn, head)(batch)``
returns the output of the head layer recorded while the loss runs, so measures written for
``model(inputs) -> outputs`` (eNTK, the plasticity probe, KFAC) work on any module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from lightning_plasticity.core.batch import batch_size
from lightning_plasticity.core.layers import get_module

__all__ = [
    "ForwardRecord",
    "HeadOutput",
    "LayerCall",
    "decoupled",
    "first_tensor",
    "hooked",
    "record_forward",
]

#: ``loss_fn(module, batch) -> scalar``: the module's own loss on a batch.
LossOfModule = Callable[[nn.Module, Any], Tensor]


def first_tensor(value: Any) -> Tensor | None:
    """``value`` if a tensor, else the first tensor of a tuple/list output (attention)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            if isinstance(v, Tensor):
                return v
    return None


@dataclass
class LayerCall:
    """One call of a hooked module: its name, the module, its first input and its output."""

    name: str
    module: nn.Module
    input: Tensor | None
    output: Tensor
    index: int = 0  # the how-many-th call of this module in the pass


@dataclass
class ForwardRecord:
    """The calls of the hooked modules in one pass, in call order, and the loss."""

    loss: Tensor | None
    calls: list[LayerCall] = field(default_factory=list)

    def of(self, name: str) -> list[LayerCall]:
        return [c for c in self.calls if c.name == name]

    def called(self) -> list[str]:
        """Names of the modules called, in the order of their first call."""
        return list(dict.fromkeys(c.name for c in self.calls))

    def head(self) -> LayerCall | None:
        """The last call of a module with a trainable parameter: the layer the loss reads."""
        for call in reversed(self.calls):
            if any(p.requires_grad for p in call.module.parameters(recurse=False)):
                return call
        return None


@contextlib.contextmanager
def hooked(modules: Mapping[str, nn.Module], on_call: Callable[[LayerCall], Any], *,
           input_graph: bool = False) -> Iterator[None]:
    """Call ``on_call(LayerCall)`` on every forward call of ``modules``; hooks removed on exit.

    ``LayerCall.input`` is a detached copy taken *before* the call when the module works in
    place (``nn.ReLU(inplace=True)`` overwrites its input), else the detached input (with
    ``input_graph``: the input itself, in the autograd graph, for penalties on it);
    ``LayerCall.output`` is the output itself (in the graph). A non-``None`` return value of
    ``on_call`` replaces the module's output (to decouple it for gradients).
    """
    counts: dict[str, int] = {}
    saved: dict[int, Tensor] = {}
    handles = []

    def pre_hook(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            saved[id(module)] = args[0].detach().clone()

    def make_hook(name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            pre = saved.pop(id(module), None)
            out = first_tensor(output)
            if out is None:
                return None
            x = pre
            if x is None and args and isinstance(args[0], Tensor):
                x = args[0] if input_graph else args[0].detach()
            index = counts.get(name, 0)
            counts[name] = index + 1
            replaced = on_call(LayerCall(name, module, x, out, index))
            if replaced is None or out is output:
                return replaced
            return (replaced, *output[1:]) if isinstance(output, tuple) else None
        return hook

    try:
        for name, module in modules.items():
            if getattr(module, "inplace", False):
                handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(make_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def decoupled(on_forward: Callable[[str, nn.Module, Tensor | None, Tensor], Any]
              ) -> Callable[[LayerCall], Tensor]:
    """An ``on_call`` for :func:`hooked` that hands ``on_forward`` a decoupled layer output.

    ``on_forward(name, module, input, output)`` gets the output (made a leaf that requires grad
    if it did not, e.g. behind frozen layers) and the network continues from a clone of it, so
    gradients w.r.t. that output are the layer output's even if the network later modifies it
    in place (``ReLU(inplace=True)``).
    """
    def on_call(call: LayerCall) -> Tensor:
        out = call.output
        if not out.requires_grad:
            out = out.detach().requires_grad_(True)
        on_forward(call.name, call.module, call.input, out)
        return out.clone()

    return on_call


def record_forward(run: Callable[[], Any], modules: Mapping[str, nn.Module], *,
                   keep_graph: bool = False) -> ForwardRecord:
    """Run ``run()`` (a loss closure) once and record every call of ``modules``.

    Args:
        run: Computes the loss; its return value is kept as :attr:`ForwardRecord.loss`.
        modules: Name -> module to hook (e.g. :func:`~.layers.parameterised_layers`).
        keep_graph: Keep outputs and the loss in the autograd graph (for gradients w.r.t. layer
            outputs); otherwise everything recorded is detached.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import torch.nn.functional as F
        >>> fc1, fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        >>> x = torch.randn(5, 3)
        >>> rec = record_forward(lambda: fc2(F.relu(fc1(x))).sum(), {"fc1": fc1, "fc2": fc2})
        >>> rec.called(), rec.head().name, bool((rec.of("fc2")[0].input >= 0).all())
        (['fc1', 'fc2'], 'fc2', True)
    """
    record = ForwardRecord(loss=None)

    def on_call(call: LayerCall) -> None:
        if not keep_graph:
            call.output = call.output.detach()
        record.calls.append(call)

    with hooked(modules, on_call):
        loss = run()
    record.loss = loss if keep_graph or not isinstance(loss, Tensor) else loss.detach()
    return record


class HeadOutput(nn.Module):
    """A module whose output is the head layer's output while ``module``'s own loss runs.

    ``forward(batch)`` runs ``loss_fn(module, batch)`` with a hook on the submodule ``head`` and
    returns the head's (last) output, in the graph, with the examples on dim 0 (a sequence-first
    output ``(T, N, ...)`` is moved to ``(N, T, ...)``). :meth:`forward_with_loss` also returns
    the loss. ``module`` is a submodule, so parameters, hooks on its layers, ``functional_call``
    and ``copy.deepcopy`` see through the wrapper (parameter names get a ``module.`` prefix).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import torch.nn.functional as F
        >>> class NoForward(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
        ...     def training_step(self, batch):
        ...         return F.cross_entropy(self.net(batch["x"]), batch["y"])
        >>> m = NoForward()
        >>> head = HeadOutput(m, lambda mod, b: mod.training_step(b), "net.2")
        >>> head({"x": torch.randn(4, 3), "y": torch.tensor([0, 1, 0, 1])}).shape
        torch.Size([4, 2])
    """

    def __init__(self, module: nn.Module, loss_fn: LossOfModule, head: str) -> None:
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn
        self.head = head

    def forward_with_loss(self, batch: Any) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []
        target = get_module(self.module, self.head)
        with hooked({self.head: target}, lambda call: captured.append(call.output)):
            loss = self.loss_fn(self.module, batch)
        if not captured:
            raise ValueError(f"the head layer {self.head!r} was not called by the loss; pass "
                             "layer= (or loss_fn=) so that the measurement reads the output the "
                             "loss uses.")
        out = captured[-1]
        n = batch_size(batch)
        if n is not None and out.dim() > 1 and out.shape[0] != n and n in out.shape[1:]:
            out = out.movedim(list(out.shape).index(n), 0)
        return out, loss

    def forward(self, batch: Any) -> Tensor:
        return self.forward_with_loss(batch)[0]
