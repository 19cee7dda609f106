"""Read the records of an offline wandb run (``run-<id>.wandb``) without network or an account.

wandb >= 0.2x no longer ships a Python reader of its transaction log (``wandb sync --view`` and
``wandb.sdk.internal.datastore`` are gone), so this is one: the file is a LevelDB-style log (a
7-byte ``:W&B`` header, then 32 KiB blocks of chunks with a 7-byte header: CRC, little-endian
length, type FULL/FIRST/MIDDLE/LAST), each record a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> Iterator[pb.Record]:
    """Every record of a ``.wandb`` file, in order (a torn last record is dropped)."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb transaction log")
    pos, parts = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # the block's tail is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:  # zero padding
            continue
        if kind == _FULL:
            parts = chunk
        elif kind == _FIRST:
            parts = chunk
            continue
        elif kind == _MIDDLE:
            parts += chunk
            continue
        elif kind == _LAST:
            parts += chunk
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")
        record = pb.Record()
        record.ParseFromString(parts)
        yield record


def offline_run_file(wandb_dir: str | Path) -> Path:
    """The one ``run-*.wandb`` file below ``wandb_dir`` (e.g. ``runs/wandb``)."""
    found = sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb"))
    if len(found) != 1:
        raise AssertionError(f"expected one offline wandb run below {wandb_dir}, found {found}")
    return found[0]


def metric_definitions(path: str | Path) -> dict[str, dict[str, Any]]:
    """``name (or glob) -> {"step_metric": ..., "step_sync": ...}`` of the run's
    ``define_metric`` calls (a later definition of a name wins)."""
    found: dict[str, dict[str, Any]] = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") != "metric":
            continue
        m = record.metric
        name = m.name or m.glob_name
        found[name] = {"step_metric": m.step_metric, "glob": bool(m.glob_name),
                       "step_sync": m.options.step_sync}
    return found


def history_rows(path: str | Path) -> list[dict[str, Any]]:
    """The run's history rows (each ``run.log`` call) as ``key -> decoded JSON value``."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows
