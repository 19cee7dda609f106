"""Choose which parameters a curvature measurement looks at.

Hessian measurements scale with the number of parameters they cover, so most callers measure a
block: the parameters of some named submodules, or of the last few layers (Lewandowski et al.,
"Directions of curvature as an explanation for loss of plasticity", measured a partial blockwise
Hessian of the last layers). Every measurement function takes the list returned here as
``params``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import Tensor, nn

from lightning_plasticity.core.layers import ROOT_NAME, describe_names, parameterised_layers

__all__ = ["NamedParams", "model_parameters", "select_parameters"]

#: A ``params`` argument: the list :func:`select_parameters` returns, or bare parameters.
NamedParams = Sequence[tuple[str, nn.Parameter] | nn.Parameter]

def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that directly own a trainable parameter (the model itself named ``""``)."""
    return [("" if name == ROOT_NAME else name, module)
            for name, module in parameterised_layers(model, trainable=True).items()]


def select_parameters(
    model: nn.Module,
    modules: Sequence[str] | None = None,
    last_n_layers: int | None = None,
) -> list[tuple[str, nn.Parameter]]:
    """Select the trainable parameters a measurement should cover.

    With neither ``modules`` nor ``last_n_layers`` this is every parameter with
    ``requires_grad=True`` (shared parameters once), in ``model.named_parameters()`` order.
    Frozen parameters are never selected.

    Args:
        model: The model.
        modules: Names of submodules as in ``model.named_modules()`` (``"encoder.0"``), or fnmatch
            patterns (``"head*"``, ``"*.fc2"``). The trainable parameters of the matched modules,
            including those of their children, are selected. Every entry must match at least one
            module.
        last_n_layers: Select the parameters of the last ``n`` layers, where a *layer* is a
            module that directly owns trainable parameters (a ``Linear``, ``Conv2d``,
            ``LayerNorm``, ...), in registration order, which for ``nn.Sequential``-style models
            is the forward order. Only the parameters the layer owns directly are taken (an
            ``nn.MultiheadAttention`` counts as one layer for its input projection and its
            ``out_proj`` as the next). Cannot be combined with ``modules``.

    Returns:
        A list of ``(qualified_name, parameter)`` pairs in ``model.named_parameters()`` order.

    Raises:
        ValueError: If the model has no trainable parameters, an entry of ``modules`` matches no
            module, the selection is empty, ``last_n_layers`` is not positive, or both selectors
            are given.

    Example::

        >>> from torch import nn
        >>> from lightning_plasticity.measures.parameter_selection import select_parameters
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> [name for name, _ in select_parameters(model, last_n_layers=1)]
        ['2.weight', '2.bias']
        >>> [name for name, _ in select_parameters(model, modules=["0"])]
        ['0.weight', '0.bias']
    """
    if modules is not None and last_n_layers is not None:
        raise ValueError(
            "select_parameters: pass either `modules` or `last_n_layers`, not both; to measure "
            "the last layers of a submodule, pass `select_parameters(model.get_submodule(name), "
            "last_n_layers=n)` and prefix the names yourself."
        )
    all_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not all_trainable:
        raise ValueError(
            f"select_parameters: {type(model).__name__} has no parameters with "
            "requires_grad=True; unfreeze the parameters to measure (p.requires_grad_(True))."
        )
    if modules is None and last_n_layers is None:
        return all_trainable

    wanted: set[int] = set()
    if modules is not None:
        if isinstance(modules, str):
            # A bare string would otherwise be iterated character by character.
            modules = [modules]
        named = list(model.named_modules())
        module_names = [n for n, _ in named]
        for pattern in modules:
            matched = [m for n, m in named if n == pattern or fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise ValueError(
                    f"select_parameters: module name or pattern {pattern!r} matches no submodule "
                    f"of {type(model).__name__}; available names include "
                    f"{describe_names([n for n in module_names if n])}."
                )
            for m in matched:
                wanted.update(id(p) for p in m.parameters() if p.requires_grad)
        if not wanted:
            raise ValueError(
                f"select_parameters: the modules {list(modules)!r} own no trainable parameters "
                "(all frozen or parameter-free); choose modules with trainable parameters."
            )
    else:
        assert last_n_layers is not None
        if isinstance(last_n_layers, bool) or not isinstance(last_n_layers, int):
            raise ValueError(
                f"select_parameters: last_n_layers must be a positive int, got {last_n_layers!r}."
            )
        if last_n_layers <= 0:
            raise ValueError(
                f"select_parameters: last_n_layers must be >= 1, got {last_n_layers}; pass "
                "last_n_layers=None to select all trainable parameters."
            )
        layers = _layers(model)
        for _, m in layers[-last_n_layers:]:
            wanted.update(id(p) for p in m.parameters(recurse=False) if p.requires_grad)
    return [(n, p) for n, p in all_trainable if id(p) in wanted]


def model_parameters(
    model: nn.Module, params: NamedParams | None,
) -> list[tuple[str, nn.Parameter]]:
    """``(qualified_name, parameter)`` pairs of ``model``, deduplicated, in the caller's order.

    Args:
        model: The model the parameters must belong to.
        params: ``None`` for all trainable parameters, or a selection from
            :func:`select_parameters` (bare parameters are accepted and named).

    Raises:
        ValueError: On an item that is not a parameter of ``model``, or an empty selection.

    Example::

        >>> from torch import nn
        >>> from lightning_plasticity.measures.parameter_selection import (
        ...     model_parameters, select_parameters)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> [name for name, _ in model_parameters(model, select_parameters(model, last_n_layers=1))]
        ['2.weight', '2.bias']
        >>> model_parameters(model, [model[2].weight])[0][0]  # bare parameters get their names
        '2.weight'
    """
    names = {id(p): n for n, p in model.named_parameters()}
    if params is None:
        selected = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    else:
        selected, seen = [], set()
        for i, item in enumerate(params):
            p = item[1] if isinstance(item, tuple) else item
            if not isinstance(p, Tensor) or id(p) not in names:
                raise ValueError(
                    f"params[{i}] is not a parameter of the model; pass parameters of `model` "
                    "or the result of select_parameters(model, ...)."
                )
            if id(p) not in seen:
                seen.add(id(p))
                selected.append((names[id(p)], p))
    if not selected:
        raise ValueError(
            "no parameters to differentiate: the model has no trainable parameters or `params` "
            "is empty."
        )
    return selected
