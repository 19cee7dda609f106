"""Tear the default process group down before the interpreter exits, on every backend.

Lightning registers ``torch.distributed.destroy_process_group`` at exit for NCCL only
(``lightning.fabric.utilities.distributed._init_dist_connection``). A gloo group left to
interpreter shutdown is destroyed in whatever order finalisation reaches its pieces, and a
DDP worker could abort there ("terminate called without an active exception", SIGABRT after
``Trainer.fit`` had finished): the run's results were written but the launcher reported a
crash. Destroying the group explicitly, as for NCCL, joins its threads in order.
"""

from __future__ import annotations

import atexit

import torch

__all__ = ["destroy_process_group_at_exit"]

_registered = False


def _destroy() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def destroy_process_group_at_exit() -> None:
    """Register (once per process) the default group's destruction at interpreter exit.

    Harmless where no group exists at exit or someone destroyed it already.

    Example::

        >>> from lightning_plasticity.core.process_group import destroy_process_group_at_exit
        >>> destroy_process_group_at_exit()  # a no-op at exit when no group was initialised
    """
    global _registered
    if not _registered:
        atexit.register(_destroy)
        _registered = True
