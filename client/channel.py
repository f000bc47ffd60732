"""The local channel between the ClientApp (the coordinator's code, run by
the SuperNode) and the site worker (the hospital's own fedseg).

One request, one reply, over a Unix socket on this machine. A frame is a
4-byte length, a JSON header and the arrays' raw bytes, nothing else: no
pickle, so a hostile app can send the worker nothing that runs as code, and
the worker sends back nothing but numbers.

Header of a request: ``kind`` (one of :data:`REQUESTS`), ``run`` (run id),
``run_config`` and ``round_config`` (scalars), ``arrays`` (name, dtype,
shape of each array that follows). A reply: ``ok``, ``metrics`` and
``arrays``, or ``ok: false`` with ``error`` (already scrubbed: it is what
the server will see) and ``refused`` (the worker would not do it).

numpy and the standard library only: the ClientApp imports no torch.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from common.errors import FedsegError

REQUESTS = ("train", "evaluate", "describe")
MAX_HEADER = 1 << 20  # bytes of JSON: settings and array names, never more
MAX_PAYLOAD = 2 << 30  # bytes of arrays: a large 3D U-Net is ~20 MB
DTYPES = ("float16", "float32", "float64", "int32", "int64", "uint8", "bool")
_LENGTH = struct.Struct(">Q")


class ChannelError(FedsegError):
    """A frame that does not follow this module's format, or a closed channel."""

    kind = "site worker channel error"


class WorkerUnavailable(FedsegError):
    kind = "site worker unavailable"


def _read_exact(sock: socket.socket, n: int) -> bytearray:
    view = bytearray(n)
    got = 0
    while got < n:
        k = sock.recv_into(memoryview(view)[got:], n - got)
        if k == 0:
            raise ChannelError("the other side closed the channel mid-frame")
        got += k
    return view


def send_frame(sock: socket.socket, header: Mapping[str, Any],
               arrays: Mapping[str, np.ndarray] | None = None) -> int:
    """Send one frame; returns its size in bytes."""
    arrays = arrays or {}
    specs, blobs = [], []
    for name, value in arrays.items():
        a = np.asarray(value)
        if a.dtype.name not in DTYPES:
            raise ChannelError(f"array {name!r} has dtype {a.dtype}, not one of {DTYPES}")
        specs.append([str(name), a.dtype.name, list(a.shape)])
        blobs.append(a.tobytes(order="C"))
    head = json.dumps({**header, "arrays": specs}, allow_nan=True).encode()
    payload = sum(len(b) for b in blobs)
    sock.sendall(_LENGTH.pack(len(head)) + _LENGTH.pack(payload) + head)
    for blob in blobs:
        sock.sendall(blob)
    return 16 + len(head) + payload


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], dict[str, np.ndarray], int]:
    """Read one frame: its header, its arrays by name, its size in bytes.
    Anything malformed is a :class:`ChannelError`; nothing is evaluated."""
    head_len, = _LENGTH.unpack(_read_exact(sock, 8))
    payload_len, = _LENGTH.unpack(_read_exact(sock, 8))
    if head_len > MAX_HEADER:
        raise ChannelError(f"header of {head_len} bytes (at most {MAX_HEADER})")
    if payload_len > MAX_PAYLOAD:
        raise ChannelError(f"payload of {payload_len} bytes (at most {MAX_PAYLOAD})")
    try:
        header = json.loads(bytes(_read_exact(sock, head_len)))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ChannelError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays", []), list):
        raise ChannelError("header is not an object with an array list")
    specs = header.pop("arrays", [])
    sizes = []
    for spec in specs:
        try:
            name, dtype, shape = spec
            dt = np.dtype(dtype)
            shape = tuple(int(s) for s in shape)
        except (TypeError, ValueError) as exc:
            raise ChannelError(f"bad array description {spec!r:.80} ({exc})") from None
        if dtype not in DTYPES or any(s < 0 for s in shape) or not isinstance(name, str):
            raise ChannelError(f"bad array description {spec!r:.80}")
        sizes.append((name, dt, shape, dt.itemsize * int(np.prod(shape, dtype=np.int64))))
    if sum(s[-1] for s in sizes) != payload_len:
        raise ChannelError("the arrays' sizes do not add up to the payload")
    arrays: dict[str, np.ndarray] = {}
    for name, dt, shape, n in sizes:
        if name in arrays:
            raise ChannelError(f"array {name!r} twice")
        arrays[name] = np.frombuffer(_read_exact(sock, n), dtype=dt).reshape(shape)
    return header, arrays, 16 + head_len + payload_len


class WorkerClient:
    """The ClientApp's end: one connection per request."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        self.path = path
        self.timeout = timeout

    def request(self, kind: str, run_id: int, run_config: Mapping[str, Any],
                round_config: Mapping[str, Any], weights: Mapping[str, np.ndarray] | None
                ) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, str]]:
        """Ask the worker; its weights, metrics and notes, or a :class:`WorkerRefused`
        / :class:`WorkerFailed` carrying the worker's scrubbed reason."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(self.path)
            except OSError as exc:
                raise WorkerUnavailable(
                    f"cannot reach this site's worker ({exc.strerror or exc}); is "
                    f"`fedseg node` running?") from None
            send_frame(sock, {"kind": kind, "run": int(run_id),
                              "run_config": dict(run_config),
                              "round_config": dict(round_config)}, weights)
            header, arrays, _ = recv_frame(sock)
        finally:
            sock.close()
        if not header.get("ok"):
            cls = WorkerRefused if header.get("refused") else WorkerFailed
            raise cls(str(header.get("error", "no reason given")))
        notes = header.get("notes") or {}
        return arrays, dict(header.get("metrics", {})), {str(k): str(v)[:300]
                                                        for k, v in notes.items()}


class WorkerFailed(FedsegError):
    """The worker tried and failed; the text is already scrubbed."""

    kind = "site worker failure"

    def scrubbed(self) -> str:
        return str(self)


class WorkerRefused(WorkerFailed):
    """The worker would not do it (the site's policy, a request outside its set)."""

    kind = "refused by the site"
