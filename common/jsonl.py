"""JSON lines files (one JSON object a line), as both sides keep them: a
site's audit log (``client/audit.py``) is read by the coordinator's
benchmarks too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_jsonl(path: Path, stop_at_broken: bool = False) -> list[dict[str, Any]]:
    """Every line of ``path`` that holds a whole JSON value, in order; a line
    cut short by a crash is skipped (``stop_at_broken``: it and every line
    after it are), a missing file has none."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut short by a crash
            if stop_at_broken:
                break
    return out
