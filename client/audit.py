"""The site's record of what left it: one JSON line per reply the worker
produced, kept in the site's state folder and printed by ``fedseg node audit``.

Each line: time, run, round, kind, outcome (``sent``, ``refused``,
``failed``), the reply's record keys (metric names, array count), its byte
size on the local channel, the seconds the worker spent on it, a SHA-256 of
the weights' bytes (name, dtype, shape and data of every array in order), so
a privacy officer can match a
reply to what the server kept (``FEDSEG_AUDIT_DIR`` on the server side).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np


def weights_hash(arrays: Mapping[str, np.ndarray]) -> str | None:
    if not arrays:
        return None
    h = hashlib.sha256()
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        h.update(f"{name}|{a.dtype.name}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, *, run: int, round: int | None, kind: str, outcome: str,
               metrics: Mapping[str, Any] | None = None,
               arrays: Mapping[str, np.ndarray] | None = None, nbytes: int = 0,
               reason: str | None = None, seconds: float | None = None) -> dict[str, Any]:
        arrays = arrays or {}
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "run": run, "round": round, "kind": kind, "outcome": outcome,
            "metrics": sorted(metrics or {}),
            "arrays": len(arrays),
            "array_bytes": int(sum(np.asarray(a).nbytes for a in arrays.values())),
            "bytes": nbytes,
            "weights_sha256": weights_hash(arrays),
        }
        if seconds is not None:
            entry["seconds"] = float(f"{seconds:.3f}")  # the worker's own time on it
        if reason:
            entry["reason"] = reason
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        return entry

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a crash
        return out
