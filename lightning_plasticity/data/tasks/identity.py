"""``identity``: every task is the base problem unchanged, the control condition."""

from __future__ import annotations

from lightning_plasticity.data.tasks.base import TaskKind


class IdentityTasks(TaskKind):
    """All tasks equal the base dataset; plasticity should not be lost through task change."""

    name = "identity"
    requires_classes = False
