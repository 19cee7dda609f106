"""Deterministic random streams derived from ``(seed, task, purpose)``.

Every per-task choice (a permutation, random labels, a teacher network, the order of examples)
comes from a generator seeded by a hash of the run's seed, the task id and a string naming what
it is for. So task ``t`` is a pure function of ``(seed, t)``: identical across runs, resumes,
processes and DataLoader workers, and independent of the order in which tasks are built.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed from ``seed`` and any number of keys, stable across Python processes.

    ``hash()`` is salted per process for strings, so a cryptographic digest is used instead.
    """
    text = "/".join([str(int(seed)), *(str(k) for k in keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`derive_seed`; never touches the global RNG."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *keys))
    return gen
