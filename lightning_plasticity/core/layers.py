"""Layer discovery: which modules are layers, and which of them a user's name patterns mean."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

__all__ = ["ROOT_NAME", "describe_names", "get_module", "match_modules", "parameterised_layers"]

#: the name of the model itself when it is a layer (``named_modules()`` calls it ``""``)
ROOT_NAME = "(root)"
_MAX_NAMES_IN_ERROR = 12


def describe_names(names: Sequence[str]) -> str:
    """``'a', 'b', ... (n more)``: module names for an error message."""
    shown = [repr(n) for n in names[:_MAX_NAMES_IN_ERROR]]
    if len(names) > _MAX_NAMES_IN_ERROR:
        shown.append(f"... ({len(names) - _MAX_NAMES_IN_ERROR} more)")
    return ", ".join(shown)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of ``model``, or ``model`` itself for :data:`ROOT_NAME`."""
    return model if name == ROOT_NAME else model.get_submodule(name)


def parameterised_layers(model: nn.Module, *, trainable: bool = False) -> dict[str, nn.Module]:
    """Modules that directly own a parameter (``trainable``: one with ``requires_grad``).

    "Directly" (``recurse=False``) rather than "leaf", so that ``nn.MultiheadAttention`` (which
    owns ``in_proj_weight`` and has an ``out_proj`` child) counts as a layer, and so does
    ``out_proj``. In registration order; the model itself is named :data:`ROOT_NAME`.

    Example::

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> list(parameterised_layers(net))
        ['0', '2']
    """
    out = {}
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False)]
        if params and (not trainable or any(p.requires_grad for p in params)):
            out[name or ROOT_NAME] = module
    return out


def match_modules(model: nn.Module, patterns: Sequence[str] | str,
                  candidates: dict[str, nn.Module] | None = None) -> dict[str, nn.Module]:
    """The modules whose names match any fnmatch pattern; every pattern must match one.

    Args:
        model: The model.
        patterns: Names as in ``model.named_modules()`` or fnmatch patterns (``"encoder.*"``).
        candidates: Restrict to these modules (default: every named submodule).

    Raises:
        ValueError: If a pattern matches nothing; the message lists the available names.

    Example::

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> list(match_modules(net, ["2"]))
        ['2']
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    pool = candidates if candidates is not None else {
        name: m for name, m in model.named_modules() if name}
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in pool):
            raise ValueError(f"{pattern!r} matches no module; available: "
                             f"{describe_names(list(pool))}.")
    return {name: m for name, m in pool.items()
            if any(fnmatch.fnmatchcase(name, p) for p in patterns)}
