"""JSON files that a reader (another process, a crashed run's report) never sees half-written.

The one home for the package's JSON state files: a study's ``study.json``, ``cell.json`` and
``status.json`` and a run's ``histories.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["read_json", "write_json"]


def read_json(path: str | os.PathLike) -> Any:
    """The decoded content of ``path``, or None when it is missing or not valid JSON.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> folder = Path(tempfile.mkdtemp())
        >>> write_json(folder / "status.json", {"state": "done"})
        >>> read_json(folder / "status.json"), read_json(folder / "missing.json")
        ({'state': 'done'}, None)
    """
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: str | os.PathLike, data: Any, **dumps_kwargs: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically: a temporary file in the same folder, then
    ``os.replace``; ``dumps_kwargs`` go to :func:`json.dumps`."""
    path = Path(path)
    text = json.dumps(data, **dumps_kwargs)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
