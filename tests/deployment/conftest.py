"""What the deployment tests share: a real local federation that leaves nothing
running behind it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from common.errors import ConfigError
from server.localfed import LocalFederation
from server.proxy import nginx_binary
from server.wire import AUDIT_DIR_ENV
from tests.federation.conftest import FLOWER_PROCESSES, processes_matching


@contextmanager
def audited_federation(work: Path, sites: list[Path], **kwargs) -> Iterator[LocalFederation]:
    """A LocalFederation whose server keeps every reply it receives in
    ``work/audit``; skips without nginx; fails if it leaves a process behind."""
    try:
        nginx_binary()
    except ConfigError as exc:
        pytest.skip(f"no real deployment without its proxy: {exc}")
    before = set(processes_matching(*FLOWER_PROCESSES))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(AUDIT_DIR_ENV, str(work / "audit"))  # every reply the server receives
        with LocalFederation(work, sites, **kwargs) as fed:
            yield fed
    left = {p: c for p, c in processes_matching(*FLOWER_PROCESSES).items() if p not in before}
    assert not left, f"processes left running: {left}"
