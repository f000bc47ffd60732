"""The site worker: the only process of a hospital's node that reads its data,
and the node's executor.

``fedseg node`` starts it from the hospital's own installed fedseg, next to
the SuperNode, as the user that may read the data folder (the SuperNode runs
as one that may not). It stays up across rounds and runs and holds the data
folder, the device and the current run's algorithm (model, decoded cases,
Adam's moments). It claims every message the SuperNode receives from the
SuperNode's local Runtime API, with the SuperExec auth secret only it and the
SuperNode hold, and answers it with this installed fedseg
(``client/executor.py``): nothing of the coordinator's app bundle is run.

Every message is checked before anything is done (a fedseg run of a wire
version this install speaks, the site's policy), and every reply that leaves,
or refusal, is a line of the site's audit log (``client/audit.py``);
refusals and failures are also logged here with their full reason, which
stays at the hospital.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger("fedseg.worker")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedseg-worker", description=__doc__.splitlines()[0])
    p.add_argument("--runtime", required=True, help="the SuperNode's Runtime API, host:port")
    p.add_argument("--secret", required=True, help="file holding the SuperExec auth secret")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--policy")
    p.add_argument("--audit", required=True)
    p.add_argument("--ledger", required=True, help="the site's privacy ledger (JSON)")
    p.add_argument("--models", help="where the site keeps the runs' final models")
    p.add_argument("--prepared", help="where the site keeps its prepared cases (in its "
                   "state folder; default: in memory)")
    p.add_argument("--ready", help="a file written once the worker takes messages")
    p.add_argument("--poll", type=float, default=0.05,
                   help="seconds between asks for a message when there is none")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="fedseg worker: %(levelname)s %(message)s")
    for noisy in ("httpx", "httpcore", "flwr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from common.processes import die_with_parent

    die_with_parent()
    os.umask(0o077)  # what the worker writes (models, audit, ledger) is the site's alone
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from client.audit import AuditLog
    from client.executor import Executor, Handler
    from client.policy import SitePolicy
    from client.privacy import SiteLedger
    from client.service import SiteService
    from common.model import pick_device

    policy = SitePolicy.load(Path(args.policy) if args.policy else None)
    service = SiteService(args.name, Path(args.data_dir), device=args.device, policy=policy,
                          models_dir=Path(args.models) if args.models else None,
                          prepared_dir=Path(args.prepared) if args.prepared else None)
    secret = Path(args.secret).read_bytes()
    handler = Handler(service, policy, AuditLog(Path(args.audit)),
                      SiteLedger(Path(args.ledger)))
    executor = Executor(args.runtime, secret, handler, poll=args.poll)

    def stop(signum, _frame):
        executor.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    import torch  # noqa: F401 - pay the import before the first round, not in it

    log.info("ready: site %s, device %s, taking messages from %s", args.name,
             pick_device(args.device), args.runtime)
    if args.ready:
        Path(args.ready).write_text(f"{os.getpid()}\n")
    thread = threading.Thread(target=executor.serve, name="fedseg-executor", daemon=True)
    thread.start()
    try:
        while thread.is_alive() and not executor.stop.is_set():
            executor.stop.wait(0.5)
    finally:
        executor.stop.set()
        thread.join(timeout=30)
        executor.close()
        if args.ready:
            Path(args.ready).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
