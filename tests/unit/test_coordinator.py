"""The coordinator's machine without a federation: the firewall chain's rules
and the state folder's modes when not started as root (the real thing, as
root: tests/deployment/test_coordinator.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from server.coordinator import LocalPortGuard, prepare_state
from server.deployment import State


def test_the_chain_lets_the_given_users_through_and_resets_the_rest():
    rules = [" ".join(r) for r in LocalPortGuard(9092, [994, 0, 65534, 0]).rules()]
    assert rules == [
        "-N FEDSEG-9092",
        "-A FEDSEG-9092 -m owner --uid-owner 0 -j RETURN",
        "-A FEDSEG-9092 -m owner --uid-owner 994 -j RETURN",
        "-A FEDSEG-9092 -m owner --uid-owner 65534 -j RETURN",
        "-A FEDSEG-9092 -p tcp -j REJECT --reject-with tcp-reset",
        "-I OUTPUT 1 -o lo -p tcp --dport 9092 --syn -j FEDSEG-9092",
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="as root the SuperLink's user is switched: "
                    "tests/deployment/test_coordinator.py")
def test_without_root_the_guard_says_why_and_changes_nothing():
    assert LocalPortGuard(9092, [0]).install() == "not started as root"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_without_a_link_user_the_state_is_the_starters_alone(tmp_path):
    state = State(tmp_path / "state").ensure()
    (state.root / "superlink.db").write_bytes(b"old layout")  # an older fedseg's database
    (state.runs / "old").mkdir()
    (state.runs / "old" / "summary.json").write_text("{}")
    os.chmod(state.runs / "old" / "summary.json", 0o644)
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        (certs / name).write_text(name)
    audit = tmp_path / "audit"
    tls = prepare_state(state, None, certs, audit)
    assert tls == state.tls and (tls / "server.key").read_text() == "server.key"
    assert state.database.read_bytes() == b"old layout"
    assert not (state.root / "superlink.db").exists()
    for path in (state.root, state.link, state.runs, state.runs / "old", state.logs, audit):
        assert mode(path) == 0o700, path
    for path in (tls / "server.key", state.database, state.runs / "old" / "summary.json"):
        assert mode(path) == 0o600, path
