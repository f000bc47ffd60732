"""``--link``: a hospital's link on the loopback (server/link.py). The
description and the refusals everywhere; the shaping itself, on a port of
its own, where this runs as root with ``tc`` (skipped, saying why,
elsewhere)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from server.link import Link, LinkError, apply, is_ours, root_qdisc, shaped, tc_binary
from server.processes import free_port


@pytest.mark.parametrize(("text", "rate", "rtt"), [
    ("50mbit:40ms", 50_000_000, 40.0), ("800kbit:0.12s", 800_000, 120.0),
    ("1Gbit", 1_000_000_000, 0.0), ("2.5mbit:500us", 2_500_000, 0.5)])
def test_a_link_is_a_rate_and_a_round_trip(text, rate, rtt):
    assert Link.parse(text) == Link(rate, rtt)


@pytest.mark.parametrize(("text", "says"), [
    ("50", "--link takes RATE[:RTT], e.g. 50mbit:40ms"), ("fast:40ms", "got 'fast:40ms'"),
    ("50mbps", "rate in bit, kbit, mbit or gbit"), ("0mbit", "--link takes RATE[:RTT]"),
    ("50mbit:40", "the round-trip time must be a duration such as 40ms, got '40'"),
    ("100bit", "a rate under 8kbit")])
def test_a_wrong_link_is_refused_saying_how_to_write_it(text, says):
    with pytest.raises(LinkError) as caught:
        Link.parse(text)
    assert says in str(caught.value)


def test_shaping_is_refused_without_root_or_tc():
    with pytest.raises(LinkError, match="needs root: run fedseg bench deploy as root, or "
                                        "leave --link out"):
        tc_binary(euid=1000, found="/usr/sbin/tc")
    with pytest.raises(LinkError, match=r"needs tc \(iproute2\), which is not installed: "
                                        r"apt-get install iproute2"):
        tc_binary(euid=0, found=None)


def can_shape() -> str:
    """tc's path, or skip saying why the shaping cannot be tried here."""
    if os.geteuid() != 0:
        pytest.skip("shaping the loopback needs root (tc); this test runs as a user")
    if not shutil.which("tc"):
        pytest.skip("tc (iproute2) is not installed here")
    tc = tc_binary()
    current = root_qdisc(tc)
    if current and not current.startswith("qdisc noqueue") and not is_ours(current):
        pytest.skip(f"lo has a root qdisc that is not fedseg's ({current.strip()})")
    return tc


def send(port: int, n: int) -> float:
    """Seconds to send ``n`` bytes over TCP to 127.0.0.1:``port`` and hear back."""
    server = socket.create_server(("127.0.0.1", port))
    done = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        got = 0
        while got < n:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        conn.sendall(b"k")
        conn.close()
        done.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with socket.create_connection(("127.0.0.1", port)) as client:
        start = time.perf_counter()
        client.sendall(b"\0" * n)
        client.recv(1)
        seconds = time.perf_counter() - start
    thread.join(10)
    server.close()
    assert done.is_set()
    return seconds


def test_the_port_is_shaped_to_the_rate_and_nothing_else_and_always_restored():
    tc = can_shape()
    port, other = free_port(), free_port()
    with shaped(Link.parse("20mbit"), port):
        assert is_ours(root_qdisc(tc))
        slow = send(port, 2_500_000)  # 20 Mbit: 1 s (less the first burst of 128 kB)
        fast = send(other, 2_500_000)  # another port on lo: unshaped
    assert 0.8 < slow < 2.0 and fast < 0.3
    assert not is_ours(root_qdisc(tc))  # removed when the block ended
    with pytest.raises(RuntimeError, match="boom"), shaped(Link.parse("20mbit"), port):
        raise RuntimeError("boom")
    assert not is_ours(root_qdisc(tc))  # also when it ended in an error
    apply(tc, Link.parse("20mbit"), port)  # as a run killed with the shaping on leaves it
    with shaped(Link.parse("100mbit"), port):  # removed first, then set anew
        classes = subprocess.run([tc, "class", "show", "dev", "lo"], capture_output=True,
                                 text=True).stdout
    assert "rate 100Mbit" in classes and "rate 20Mbit" not in classes
    assert not is_ours(root_qdisc(tc))


def test_a_round_trip_time_is_added_where_the_kernel_has_netem():
    tc = can_shape()
    port = free_port()
    try:
        with shaped(Link.parse("100mbit:60ms"), port):
            server = socket.create_server(("127.0.0.1", port))
            with socket.create_connection(("127.0.0.1", port)) as client:
                conn, _ = server.accept()
                start = time.perf_counter()
                client.sendall(b"p")
                conn.recv(1)
                conn.sendall(b"q")
                client.recv(1)
                rtt = time.perf_counter() - start
            conn.close()
            server.close()
    except LinkError as exc:
        assert "this kernel cannot delay packets" in str(exc)
        assert not is_ours(root_qdisc(tc))  # refused, and nothing left behind
        pytest.skip(f"this kernel has no netem: {exc}")
    assert 0.055 < rtt < 0.2
    assert not is_ours(root_qdisc(tc))
