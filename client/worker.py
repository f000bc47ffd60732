"""The site worker: the only process of a hospital's node that reads its data.

``fedseg node`` starts it from the hospital's own installed fedseg, next to
the SuperNode, as the user that may read the data folder (the SuperNode and
the ClientApps it starts run as one that may not). It stays up across rounds
and runs and holds the data folder, the device and the current run's
algorithm (model, decoded cases, Adam's moments), and answers the ClientApp
over a Unix socket (``client/channel.py``) that only this node's users can
open: the socket's permissions, and the peer's uid checked on every
connection.

Every request is checked before anything is done: a kind outside the closed
set, malformed frames, weights that are not the run's model, a run the site's
policy refuses. Every reply it produced, or refused, goes to the site's audit
log (``client/audit.py``); refusals and failures are also logged here with
their full reason, which stays at the hospital.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from client.audit import AuditLog
from client.channel import ChannelError, recv_frame, send_frame
from client.policy import PolicyRefusal, SitePolicy
from client.service import RequestRefused, SiteService
from common.errors import FedsegError, scrub
from common.site_algorithm import run_round

log = logging.getLogger("fedseg.worker")

READ_TIMEOUT = 60.0  # a request must arrive whole within this (the worker serves one at a time)


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class Worker:
    def __init__(self, service: SiteService, audit: AuditLog, allowed_uids: set[int]) -> None:
        self.service = service
        self.audit = audit
        self.allowed_uids = allowed_uids

    def serve_one(self, conn: socket.socket) -> None:
        uid = peer_uid(conn)
        if uid not in self.allowed_uids:
            log.warning("refused a connection from uid %d (only %s may ask)", uid,
                        sorted(self.allowed_uids))
            return
        conn.settimeout(READ_TIMEOUT)
        run, rnd, kind = 0, None, "?"
        try:  # reading the request: anything wrong here is the sender's, refused
            header, arrays, _ = recv_frame(conn)
            kind = str(header.get("kind", "?"))[:40]
            run = int(header.get("run", 0))
            run_config = header.get("run_config") or {}
            round_config = header.get("round_config") or {}
            if not isinstance(run_config, dict) or not isinstance(round_config, dict):
                raise RequestRefused("settings must be key-value objects")
            rnd = run_round(round_config) if kind != "describe" else None
        except (ChannelError, RequestRefused, ValueError, TypeError) as exc:
            return self._refused(conn, exc, kind, run, rnd)
        start = time.perf_counter()
        conn.settimeout(None)
        try:  # doing it: a refusal of the service's, or a failure at the site
            out, metrics, notes = self.service.handle(kind, run, run_config, round_config, arrays)
        except (RequestRefused, PolicyRefusal) as exc:
            return self._refused(conn, exc, kind, run, rnd)
        except Exception as exc:  # noqa: BLE001 - the site's log has it; the server a scrub
            return self._failed(conn, exc, kind, run, rnd)
        nbytes = self._reply(conn, {"ok": True, "metrics": metrics, "notes": notes}, out)
        self.audit.append(run=run, round=rnd, kind=kind, outcome="sent", metrics=metrics,
                          arrays=out, nbytes=nbytes,
                          reason="; ".join(f"{k}: {v}" for k, v in notes.items()) or None,
                          seconds=time.perf_counter() - start)
        log.info("%s (run %d, round %s) answered in %.1f s", kind, run, rnd,
                 time.perf_counter() - start)

    def _refused(self, conn: socket.socket, exc: Exception, kind: str, run: int,
                 rnd: int | None) -> None:
        refusal = exc if isinstance(exc, RequestRefused | PolicyRefusal) else RequestRefused(
            f"malformed request ({type(exc).__name__})")
        log.warning("refused %s request (run %s, round %s): %s", kind, run, rnd, exc)
        self.audit.append(run=run, round=rnd, kind=kind, outcome="refused",
                          reason=str(exc)[:300])
        self._reply(conn, {"ok": False, "refused": True, "error": refusal.scrubbed()})

    def _failed(self, conn: socket.socket, exc: Exception, kind: str, run: int,
                rnd: int | None) -> None:
        log.error("%s request failed (run %s, round %s): %s", kind, run, rnd, exc,
                  exc_info=not isinstance(exc, FedsegError))
        self.audit.append(run=run, round=rnd, kind=kind, outcome="failed", reason=scrub(exc))
        self._reply(conn, {"ok": False, "error": scrub(exc)})

    @staticmethod
    def _reply(conn: socket.socket, header: dict, arrays=None) -> int:
        try:
            return send_frame(conn, header, arrays)
        except OSError as exc:
            log.warning("the ClientApp left before the reply (%s)", exc)
            return 0


def listen(path: Path, group: int | None = None) -> socket.socket:
    """A Unix socket at ``path`` that only its owner (and ``group``) may use."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        path.unlink()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        srv.bind(str(path))
    finally:
        os.umask(old)
    if group is not None:
        os.chmod(path, 0o660)
    srv.listen(8)
    return srv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedseg-worker", description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--policy")
    p.add_argument("--audit", required=True)
    p.add_argument("--models", help="where the site keeps the runs' final models")
    p.add_argument("--allow-uid", type=int, action="append", default=[])
    p.add_argument("--group", type=int, help="gid that may open the socket")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="fedseg worker: %(levelname)s %(message)s")
    from common.processes import die_with_parent

    die_with_parent()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    policy = SitePolicy.load(Path(args.policy) if args.policy else None)
    service = SiteService(args.name, Path(args.data_dir), device=args.device, policy=policy,
                          models_dir=Path(args.models) if args.models else None)
    worker = Worker(service, AuditLog(Path(args.audit)), {os.getuid(), *args.allow_uid})
    srv = listen(Path(args.socket), args.group)

    def stop(signum, _frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    import torch  # noqa: F401 - pay the import before the first round, not in it

    from common.model import pick_device

    log.info("ready: site %s, device %s, socket %s", args.name, pick_device(args.device),
             args.socket)
    try:
        while True:
            conn, _ = srv.accept()
            with conn:
                try:
                    worker.serve_one(conn)
                except Exception as exc:  # noqa: BLE001 - one bad request never stops the site
                    log.error("request not served: %s", exc, exc_info=exc)
    except (SystemExit, KeyboardInterrupt):
        return 0
    finally:
        srv.close()
        Path(args.socket).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
