"""Wall time of the quickstart recipe with measurement callbacks at their defaults / without.

Runs ``lightning-plasticity fit --config recipes/quickstart.yaml`` as a subprocess, once plain and
once with the given callbacks appended (``--trainer.callbacks+=<Name>``), alternating for
``--repeats`` rounds so both see the same machine load, and prints the ratio of the best wall
times and the extra time per task in units of one task's share of the plain wall time. The runs
write into a temporary folder. Target for ``HessianRankCallback``: <= 1.15.

Usage::

    .venv/bin/python benchmarks/callback_overhead.py                       # HessianRankCallback
    .venv/bin/python benchmarks/callback_overhead.py --callbacks KFACCallback ENTKCallback
    .venv/bin/python benchmarks/callback_overhead.py \
        --cli-arg=--trainer.callbacks.init_args.every_n_tasks=5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run_recipe(extra: list[str], workdir: Path) -> float:
    script = Path(sys.executable).with_name("lightning-plasticity")
    cmd = [str(script), "fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), *extra]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=workdir, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callbacks", nargs="+", default=["HessianRankCallback"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cli-arg", action="append", default=[],
                        help="extra CLI argument for the measured run, e.g. "
                             "--cli-arg=--trainer.callbacks.init_args.every_n_tasks=5 (applies to "
                             "the last callback)")
    args = parser.parse_args()
    extra = [f"--trainer.callbacks+={name}" for name in args.callbacks] + args.cli_arg
    plain, measured = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            plain.append(run_recipe([], Path(tmp)))
            measured.append(run_recipe(extra, Path(tmp)))
    print(f"quickstart recipe, best of {args.repeats} (s): plain {min(plain):.1f}, "
          f"with {' + '.join(args.callbacks)} {' '.join(args.cli_arg)} {min(measured):.1f}")
    print(f"ratio with / without: {min(measured) / min(plain):.3f}")
    config = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    tasks = config["data"]["init_args"]["num_tasks"]
    extra_per_task = (min(measured) - min(plain)) / tasks
    share = min(plain) / tasks
    print(f"extra time per task: {extra_per_task:.3f} s = {extra_per_task / share:.3f} of one "
          f"task's share of the plain wall time ({share:.3f} s, incl. start-up)")


if __name__ == "__main__":
    main()
