"""A hospital's link on the loopback: Linux traffic control on one TCP port.

``fedseg bench deploy --link 50mbit:40ms`` runs its federation on 127.0.0.1;
this shapes the traffic to and from the SuperLink's public port (every byte
between the hospitals' nodes and the server, and nothing else on ``lo``) like
a hospital's link: each direction at the rate given, and, where the kernel has
netem, half the round-trip time of delay each way. It needs root and ``tc``
(iproute2).

What it sets on ``lo`` (``tc``'s own words)::

    qdisc htb fe5d: root (default 0: all other traffic passes unshaped)
      class fe5d:1  rate R   <- filter u32 ip sport PORT (server -> hospitals)
        qdisc netem fe51: delay RTT/2   (with a round-trip time)
      class fe5d:2  rate R   <- filter u32 ip dport PORT (hospitals -> server)
        qdisc netem fe52: delay RTT/2

The root qdisc's handle ``fe5d:`` marks it as fedseg's: :func:`shaped` removes
it when it ends (also on error or Ctrl-C), and removes one a killed run left
behind before it starts. A root qdisc on ``lo`` that is not fedseg's is left
alone and the shaping refused.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from common.errors import FedsegError

log = logging.getLogger(__name__)

HANDLE = "fe5d"  # fedseg's root qdisc on the loopback
DEVICE = "lo"
MTU = 65536  # the loopback's: a packet may be this large
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$", re.IGNORECASE)
_DELAY = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s)$", re.IGNORECASE)
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_DELAY_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


class LinkError(FedsegError):
    """The link cannot be shaped (or its description is wrong)."""

    kind = "link shaping error"

    def scrubbed(self) -> str:
        return f"fedseg {self.kind}: {self}"


@dataclass(frozen=True)
class Link:
    """A link: ``rate_bit`` bits a second each way, ``rtt_ms`` round trip."""

    rate_bit: int
    rtt_ms: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Link:
        """``RATE[:RTT]``: ``50mbit:40ms``, ``800kbit:120ms``, ``1gbit``."""
        rate, _, rtt = str(text).strip().partition(":")
        m = _RATE.match(rate.strip())
        if not m or float(m.group(1)) <= 0:
            raise LinkError(f"--link takes RATE[:RTT], e.g. 50mbit:40ms (rate in bit, kbit, "
                            f"mbit or gbit a second, round-trip time in us, ms or s), got "
                            f"{text!r}")
        bits = round(float(m.group(1)) * _RATE_UNITS[m.group(2).lower()])
        rtt_ms = 0.0
        if rtt.strip():
            d = _DELAY.match(rtt.strip())
            if not d:
                raise LinkError(f"--link: the round-trip time must be a duration such as "
                                f"40ms, got {rtt!r}")
            rtt_ms = float(d.group(1)) * _DELAY_UNITS[d.group(2).lower()]
        if bits < 8_000:
            raise LinkError(f"--link: a rate under 8kbit ({bits} bit/s) is not a link")
        return cls(bits, rtt_ms)

    def __str__(self) -> str:
        rate = (f"{self.rate_bit / 1e9:g} Gbit/s" if self.rate_bit >= 1e9 else
                f"{self.rate_bit / 1e6:g} Mbit/s" if self.rate_bit >= 1e6 else
                f"{self.rate_bit / 1e3:g} kbit/s")
        return f"{rate} each way" + (f", {self.rtt_ms:g} ms round trip" if self.rtt_ms
                                     else ", no added delay")


_LOOK_UP = object()


def tc_binary(euid: int | None = None, found: Any = _LOOK_UP) -> str:
    """``tc``'s path, or a :class:`LinkError` saying why the link cannot be
    shaped here: not root, or no ``tc``. ``euid``: this process's by default;
    ``found``: tc's path as found (None: absent), ``shutil.which`` by default."""
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        raise LinkError("--link shapes the loopback with Linux traffic control, which needs "
                        "root: run fedseg bench deploy as root, or leave --link out")
    path = shutil.which("tc") if found is _LOOK_UP else found
    if not path:
        raise LinkError("--link needs tc (iproute2), which is not installed: apt-get install "
                        "iproute2 (or your system's iproute2 package), or leave --link out")
    return path


def _tc(tc: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([tc, *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise LinkError(f"tc {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout}")
    return proc


def root_qdisc(tc: str, device: str = DEVICE) -> str:
    """The root qdisc line of ``device`` (``qdisc noqueue 0: root ...`` unset)."""
    out = _tc(tc, "qdisc", "show", "dev", device).stdout
    return next((line for line in out.splitlines() if " root " in f" {line} "), "")


def is_ours(line: str) -> bool:
    return f" {HANDLE}: " in f" {line} "


def remove(tc: str, device: str = DEVICE) -> bool:
    """Remove fedseg's root qdisc from ``device`` (and with it its classes,
    filters and delays); whether there was one."""
    if not is_ours(root_qdisc(tc, device)):
        return False
    _tc(tc, "qdisc", "del", "dev", device, "root", "handle", f"{HANDLE}:")
    return True


def apply(tc: str, link: Link, port: int, device: str = DEVICE) -> None:
    """Shape ``port``'s traffic on ``device`` as ``link`` (see the module's
    docstring). A kernel without netem refuses a round-trip time."""
    rate = f"{link.rate_bit}bit"
    burst = str(max(2 * MTU, link.rate_bit // 8 // 100))  # a packet at least; 10 ms of rate
    _tc(tc, "qdisc", "add", "dev", device, "root", "handle", f"{HANDLE}:", "htb", "default",
        "0")
    for minor, (direction, field) in enumerate((("server to hospitals", "sport"),
                                                ("hospitals to server", "dport")), start=1):
        _tc(tc, "class", "add", "dev", device, "parent", f"{HANDLE}:", "classid",
            f"{HANDLE}:{minor}", "htb", "rate", rate, "ceil", rate, "burst", burst,
            "cburst", burst, "quantum", str(MTU + 1024))
        if link.rtt_ms:
            half = f"{link.rtt_ms * 500:.0f}us"  # half the round trip each way
            proc = _tc(tc, "qdisc", "add", "dev", device, "parent", f"{HANDLE}:{minor}",
                       "handle", f"fe5{minor}:", "netem", "delay", half, "limit", "100000",
                       check=False)
            if proc.returncode != 0:
                raise LinkError(
                    f"this kernel cannot delay packets (tc's netem qdisc: "
                    f"{proc.stderr.strip()}; the kernel needs sch_netem, CONFIG_NET_SCH_NETEM): "
                    f"give --link without a round-trip time (e.g. "
                    f"{link.rate_bit / 1e6:g}mbit) to shape the rate alone, or run where "
                    f"'modprobe sch_netem' works")
        _tc(tc, "filter", "add", "dev", device, "parent", f"{HANDLE}:", "protocol", "ip",
            "prio", "1", "u32", "match", "ip", field, str(port), "0xffff", "flowid",
            f"{HANDLE}:{minor}")
        log.info("link shaping: %s on port %d at %s", direction, port, link)


@contextmanager
def shaped(link: Link, port: int, device: str = DEVICE) -> Iterator[None]:
    """Within the block, TCP ``port`` on ``device`` behaves as ``link``; the
    shaping is removed when the block ends, however it ends. A shaping left
    by a run that was killed is removed first; any other root qdisc on
    ``device`` is left alone and the shaping refused."""
    tc = tc_binary()
    if remove(tc, device):
        log.warning("removed the link shaping a previous run left on %s", device)
    current = root_qdisc(tc, device)
    if current and not current.startswith("qdisc noqueue"):
        raise LinkError(f"{device} already has a root qdisc that fedseg did not set "
                        f"({current.strip()}): remove it (tc qdisc del dev {device} root) or "
                        f"leave --link out")
    try:
        apply(tc, link, port, device)
        yield
    finally:
        remove(tc, device)
