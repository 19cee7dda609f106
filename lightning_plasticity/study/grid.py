"""A study's grid: recipes x method variants x seeds, each cell one ``lightning-plasticity fit``.

A study file (YAML) names recipes, methods (CLI overrides; a list value sweeps a coefficient)
and seeds::

    name: lewandowski2024
    recipes:                      # name -> recipe path, relative to the study file
      label_permuted: label_permuted_mnist.yaml
      label_permuted_tanh:        # or a recipe with overrides (and seeds) of its own
        recipe: label_permuted_mnist.yaml
        args: {model.init_args.network.init_args.activation: tanh}
        seeds: [0]
    methods:                      # name -> dotted CLI keys -> values
      plain: {}
      l2:
        model.class_path: L2Classifier
        model.init_args.l2_coef: [1.0e-4, 1.0e-3]    # a list: one variant per value
      shrink_and_perturb:         # `key+` appends to a list (LightningCLI's syntax)
        trainer.callbacks+:
          - {class_path: ShrinkAndPerturb, init_args: {alpha: 0.4}}
          - {class_path: ShrinkAndPerturb, init_args: {alpha: 0.8}}
    seeds: [0, 1, 2]              # --seed_everything and --data.init_args.seed
    args:                         # overrides for every cell (scale, data folder)
      data.init_args.data_dir: ${LP_DATA_DIR:-data}
    only: {label_permuted: [plain, l2]}   # optional: which methods run on which recipe

Values may use ``${VAR}`` and ``${VAR:-default}`` from the environment. :func:`expand_study`
turns this into :class:`Cell` objects with stable ids; nothing here runs anything.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Cell", "StudySpec", "expand_study", "load_study_spec"]

_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")
_SAFE = re.compile(r"[^A-Za-z0-9_.=+-]")


def _expand_env(value: Any) -> Any:
    """``${VAR}`` / ``${VAR:-default}`` in strings, recursively; unknown without default: error."""
    if isinstance(value, str):
        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is None:
                raise ValueError(f"study: environment variable {name} is not set (write "
                                 f"${{{name}:-default}} to give a default).")
            return default
        return _ENV.sub(sub, value)
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    return value


def _cli_value(value: Any) -> str:
    """A YAML value as one CLI argument (jsonargparse parses it back as YAML)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a recipe with one method variant and one seed."""

    recipe: str
    recipe_path: str
    method: str
    variant: str
    params: dict[str, Any]
    seed: int
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """A folder name, unique in the study: ``recipe__method__variant__seed0``."""
        return _SAFE.sub("_", f"{self.recipe}__{self.method}__{self.variant}__seed{self.seed}")

    def command(self, executable: str = "lightning-plasticity") -> list[str]:
        """The ``fit`` command line of this cell (run in the cell's own folder)."""
        command = [executable, "fit", "--config", self.recipe_path,
                   "--seed_everything", str(self.seed), "--data.init_args.seed", str(self.seed)]
        for key, value in {**self.args, **self.params}.items():
            command += [f"--{key}", _cli_value(value)]
        return command

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "id": self.id, "command": self.command()}


@dataclass(frozen=True)
class StudySpec:
    """A parsed study file (see the module docstring)."""

    name: str
    path: Path
    recipes: dict[str, Path]
    recipe_args: dict[str, dict[str, Any]]
    recipe_seeds: dict[str, list[int]]
    methods: dict[str, dict[str, Any]]
    seeds: list[int]
    args: dict[str, Any]
    only: dict[str, list[str]]
    slurm: dict[str, Any]
    report: dict[str, Any]


def _seeds(value: Any, key: str) -> list[int]:
    seeds = [value] if isinstance(value, int) else value
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"study: `{key}:` must be a list of integers, got {value!r}.")
    return list(seeds)


def load_study_spec(path: str | os.PathLike) -> StudySpec:
    """Read and validate a study file; every error names the key to change."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"study: no study file at {str(path)!r}.")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"study: {path} must hold a mapping (name, recipes, methods, seeds).")
    unknown = set(raw) - {"name", "recipes", "methods", "seeds", "args", "only", "slurm",
                          "report"}
    if unknown:
        raise ValueError(f"study: unknown keys {sorted(unknown)} in {path}; allowed: name, "
                         "recipes, methods, seeds, args, only, slurm, report.")
    raw = _expand_env(raw)
    name = str(raw.get("name") or path.parent.name)
    recipes_raw = raw.get("recipes")
    if not isinstance(recipes_raw, dict) or not recipes_raw:
        raise ValueError(f"study: {path} needs `recipes:`, a mapping of name -> recipe file.")
    recipes, recipe_args, recipe_seeds = {}, {}, {}
    for rname, entry in recipes_raw.items():
        rpath = entry
        if isinstance(entry, dict):
            if set(entry) - {"recipe", "args", "seeds"} or "recipe" not in entry:
                raise ValueError(f"study: recipe {rname!r} must be a path or a mapping with "
                                 "`recipe:` (a path) and optional `args:` and `seeds:`.")
            rpath = entry["recipe"]
            recipe_args[str(rname)] = dict(entry.get("args") or {})
            if "seeds" in entry:
                recipe_seeds[str(rname)] = _seeds(entry["seeds"], f"recipes.{rname}.seeds")
        full = (path.parent / str(rpath)).resolve()
        if not full.is_file():
            raise FileNotFoundError(f"study: recipe {rname!r} points at {str(full)!r}, which "
                                    "does not exist (paths are relative to the study file).")
        recipes[str(rname)] = full
    methods = raw.get("methods") or {"default": {}}
    if not isinstance(methods, dict) or not all(isinstance(v, dict) or v is None
                                                for v in methods.values()):
        raise ValueError("study: `methods:` must map each method name to a mapping of dotted "
                         "CLI keys to values ({} for none).")
    methods = {str(k): dict(v or {}) for k, v in methods.items()}
    seeds = _seeds(raw.get("seeds", [0]), "seeds")
    only = {str(k): [str(m) for m in v] for k, v in (raw.get("only") or {}).items()}
    for rname, names in only.items():
        if rname not in recipes:
            raise ValueError(f"study: `only:` names recipe {rname!r}, not one of "
                             f"{sorted(recipes)}.")
        missing = set(names) - set(methods)
        if missing:
            raise ValueError(f"study: `only:` names methods {sorted(missing)} that are not "
                             f"under `methods:` ({sorted(methods)}).")
    return StudySpec(name=name, path=path, recipes=recipes, recipe_args=recipe_args,
                     recipe_seeds=recipe_seeds, methods=methods, seeds=list(seeds),
                     args=dict(raw.get("args") or {}), only=only,
                     slurm=dict(raw.get("slurm") or {}), report=dict(raw.get("report") or {}))


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _label(key: str, value: Any) -> str:
    """A variant's name for one swept value: ``l2_coef=0.001``; a class's init args."""
    if isinstance(value, dict) and "class_path" in value:
        args = value.get("init_args") or {}
        inner = ",".join(f"{k}={_cli_value(v)}" for k, v in args.items())
        return inner or str(value["class_path"]).rsplit(".", 1)[-1]
    return f"{_short(key.rstrip('+'))}={_cli_value(value)}"


def method_variants(overrides: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each combination of the list-valued overrides: ``[(variant name, params), ...]``.

    Example::

        >>> variants = method_variants({"model.init_args.l2_coef": [0.01, 0.1],
        ...                             "model.class_path": "L2Classifier"})
        >>> [name for name, _ in variants]
        ['l2_coef=0.01', 'l2_coef=0.1']
        >>> variants[1][1]
        {'model.init_args.l2_coef': 0.1, 'model.class_path': 'L2Classifier'}
        >>> method_variants({})
        [('default', {})]
    """
    swept = [k for k, v in overrides.items() if isinstance(v, list)]
    if not swept:
        return [("default", dict(overrides))]
    variants = []
    for values in itertools.product(*(overrides[k] for k in swept)):
        params = dict(overrides)
        params.update(zip(swept, values))
        name = ",".join(_label(k, v) for k, v in zip(swept, values))
        variants.append((name, params))
    return variants


def expand_study(spec: StudySpec, extra_args: dict[str, Any] | None = None) -> list[Cell]:
    """All cells of the study, in recipe, method, variant, seed order."""
    cells = []
    for rname, rpath in spec.recipes.items():
        args = {**spec.args, **spec.recipe_args.get(rname, {}), **(extra_args or {})}
        for mname, overrides in spec.methods.items():
            if rname in spec.only and mname not in spec.only[rname]:
                continue
            for variant, params in method_variants(overrides):
                for seed in spec.recipe_seeds.get(rname, spec.seeds):
                    cells.append(Cell(rname, str(rpath), mname, variant, params, seed, args))
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise ValueError("study: two cells have the same id; give methods and recipes "
                         "distinct names.")
    return cells
