"""The site's record of what left it: one JSON line per message the node sent,
kept in the site's state folder and printed by ``fedseg node audit``.

The hospital's executor (``client/executor.py``) writes the line from the
very message it pushes to the SuperNode, after every mod (DP noise, SecAgg+
masking) has acted on it, so each SecAgg+ stage has its own line and nothing
can be added after the record is made. Each line:

* time, run, round, kind (``train``, ``evaluate``, ``query`` (the fingerprint
  at a run's start); SecAgg+ stages as
  ``train/secagg:share_keys``...), outcome (``sent``: a reply with content;
  ``refused``: the site would not do it, ``failed``: it tried; both send an
  error reply, whose scrubbed reason is the line's ``reason``; a second line
  ``not sent``, with the same message id, where handing the reply to the
  SuperNode failed or the SuperNode had dropped the task meanwhile);
* ``message_id``: the reply's Flower message id, the SHA-256 of its content
  tree. The server receives the same id with the message
  (``msg.metadata.message_id``; the server's audit folder, ``FEDSEG_AUDIT_DIR``,
  names each file with it), so a privacy officer can match a line to what
  the coordinator kept;
* ``records``: each record's name, type and keys; for the aggregate numbers
  (``metrics``: scores, losses, the fingerprint) and the ``site`` record (name,
  notes) also their values as sent; never a weight; ``arrays``
  and ``array_bytes``: the count and size of the arrays; ``bytes``: the
  content as serialised for the wire; ``weights_sha256``: a hash of the
  weights' bytes (name, dtype, shape, data of every array in order);
* ``bundle``: the SHA-256 of the run's app bundle (what the policy's
  ``allowed-bundles`` pins); ``seconds``: the executor's own time on the
  message; ``reason``: why it was refused or failed, or the reply's notes.
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

from common import wire
from common.jsonl import read_jsonl


def weights_hash(arrays: Mapping[str, np.ndarray]) -> str | None:
    if not arrays:
        return None
    h = hashlib.sha256()
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        h.update(f"{name}|{a.dtype.name}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def describe_reply(reply) -> dict[str, Any]:
    """What an audit line says of a Flower ``Message`` about to be sent: its
    id (as the server will see it), records and their keys, sizes, hashes."""
    from flwr.common.serde import recorddict_to_proto

    if reply.has_error():
        return {"message_id": reply.object_id, "records": {}, "arrays": 0,
                "array_bytes": 0, "bytes": 0, "weights_sha256": None}
    content = reply.content
    records: dict[str, dict[str, Any]] = {}
    arrays: dict[str, np.ndarray] = {}
    for name, record in content.array_records.items():
        records[name] = {"type": "arrays", "keys": sorted(record.keys())}
        arrays.update({f"{name}/{k}": a.numpy() for k, a in record.items()})
    for name, record in content.metric_records.items():
        records[name] = {"type": "metrics", "keys": sorted(record.keys())}
        if name == wire.METRICS:  # aggregate numbers: the values that left, as they left
            records[name]["values"] = {k: record[k] for k in sorted(record.keys())}
    for name, record in content.config_records.items():
        records[name] = {"type": "config", "keys": sorted(record.keys())}
        if name == wire.SITE:
            records[name]["values"] = {k: str(record[k])[:200] for k in sorted(record.keys())}
    return {
        "message_id": reply.object_id,
        "records": records,
        "arrays": len(arrays),
        "array_bytes": int(sum(a.nbytes for a in arrays.values())),
        "bytes": recorddict_to_proto(content).ByteSize(),
        "weights_sha256": weights_hash(arrays),
    }


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, *, run: int, round: int | None, kind: str, outcome: str,
               reason: str | None = None, seconds: float | None = None,
               **described: Any) -> dict[str, Any]:
        """One line; ``described``: :func:`describe_reply`'s fields."""
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "run": run, "round": round, "kind": kind, "outcome": outcome,
            **described,
        }
        if seconds is not None:
            entry["seconds"] = float(f"{seconds:.3f}")  # the executor's own time on it
        if reason:
            entry["reason"] = reason
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")
        return entry

    def entries(self) -> list[dict[str, Any]]:
        """Every line so far (one cut short by a crash is skipped)."""
        return read_jsonl(self.path)
