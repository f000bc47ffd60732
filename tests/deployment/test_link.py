"""``fedseg bench deploy --link``: a real deployment on 127.0.0.1 over a
loopback shaped like a hospital's link, float32 and float16 side by side.
Needs root, tc and nginx (skipped, saying why, without them)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import ConfigError
from server.link import is_ours, root_qdisc
from server.proxy import nginx_binary
from server.simulation import APP_DIR, runtime_env
from tests.federation.conftest import no_leftover_processes  # noqa: F401 - the fixture
from tests.unit.test_link import can_shape

# two deployed runs: about 2 minutes on 2 cores
pytestmark = [pytest.mark.federation, pytest.mark.slow,
              pytest.mark.usefixtures("no_leftover_processes")]


def test_bench_deploy_compares_the_precisions_over_a_shaped_link():
    tc = can_shape()
    try:
        nginx_binary()
    except ConfigError as exc:
        pytest.skip(f"no real deployment without its proxy: {exc}")
    cmd = [sys.executable, "-m", "server.cli", "bench", "deploy", "--link", "20mbit",
           "--rounds", "2", "--config", "model-channels=16,32,64", "--config", "patch-size=32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=APP_DIR,
                          env=runtime_env(1))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert not is_ours(root_qdisc(tc))  # the shaping is gone
    assert "transfer-precision float32, over 20 Mbit/s each way" in out
    table = Path(re.search(r"the table as markdown: (\S+link\.md)", out.replace("\n", ""))
                 .group(1)).read_text()
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert [r[0] for r in rows] == ["| 1", "| 2"]
    for row in rows:
        full, half = ([float(x) for x in cell.split(" / ")] for cell in row[4:6])
        assert half == pytest.approx([x / 2 for x in full], rel=0.02)  # bytes down / up
        assert float(row[1]) > 0 and float(row[2]) > 0
