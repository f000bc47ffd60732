"""The site worker as a real process, asked over its real socket: the closed
set of requests, the run's model only, the site's policy, the audit log, and
who may connect. Also: the ClientApp that talks to it imports no torch."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from client.audit import AuditLog, weights_hash
from client.channel import (
    ChannelError,
    WorkerClient,
    WorkerFailed,
    WorkerRefused,
    recv_frame,
    send_frame,
)
from client.policy import PolicyRefusal, SitePolicy
from common.config import ConfigError, RunSettings
from common.model import build_model
from common.packing import pack
from common.processes import stop_group

ROOT = Path(__file__).resolve().parents[2]
RUN = {"local-epochs": 1, "seed": 0, "num-rounds": 3}


def model_weights(run_config=RUN) -> dict[str, np.ndarray]:
    model = build_model(RunSettings.from_run_config(run_config).model)
    return pack(model.state_dict())  # as the wire carries it


@pytest.fixture(scope="module")
def worker(synthetic_sites, tmp_path_factory):
    """A worker on the first synthetic site with a policy allowing at most 3
    rounds and no FedAdam."""
    folder = tmp_path_factory.mktemp("worker")
    policy = folder / "policy.toml"
    policy.write_text('max-rounds = 3\nallowed-strategies = ["fedavg", "fedprox"]\n')
    sock, audit = folder / "worker.sock", folder / "audit.jsonl"
    log = open(folder / "worker.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "client.worker", "--socket", str(sock), "--data-dir",
         str(synthetic_sites[0]), "--name", "hospital-a", "--threads", "1", "--audit",
         str(audit), "--policy", str(policy)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (
            folder / "worker.log").read_text()
        time.sleep(0.1)
    try:
        yield WorkerClient(str(sock)), AuditLog(audit), folder / "worker.log", sock
    finally:
        stop_group(proc.pid)
        log.close()


def test_frames_round_trip_and_malformed_ones_are_refused():
    a, b = socket.socketpair()
    with a, b:
        arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3)}
        size = send_frame(a, {"kind": "train"}, arrays)
        header, got, n = recv_frame(b)
        assert header == {"kind": "train"} and n == size
        assert got.keys() == arrays.keys() and all(np.array_equal(got[k], arrays[k])
                                                   for k in arrays)
        got["w"][0, 0] = 1  # writable: torch takes it without a copy warning
        with pytest.raises(ChannelError, match="dtype"):
            send_frame(a, {}, {"o": np.array([object()])})

    def refused(raw: bytes) -> str:
        a, b = socket.socketpair()
        with a, b:
            b.settimeout(5)
            a.sendall(raw)
            a.shutdown(socket.SHUT_WR)
            with pytest.raises(ChannelError) as err:
                recv_frame(b)
            return str(err.value)

    def frame(head: bytes, payload: bytes) -> bytes:
        return len(head).to_bytes(8, "big") + len(payload).to_bytes(8, "big") + head + payload

    assert "add up" in refused(frame(b'{"arrays": [["w", "float32", [1000]]]}', b"\0" * 4))
    assert "header of" in refused((1 << 40).to_bytes(8, "big") + (0).to_bytes(8, "big"))
    assert "bad array" in refused(frame(b'{"arrays": [["w", "object", [1]]]}', b"\0" * 8))
    assert "not JSON" in refused(frame(b"{oops", b""))
    assert "closed" in refused(frame(b'{"arrays": []}', b"")[:12])


def test_the_worker_trains_scores_and_records_what_left(worker):
    client, audit, _, _ = worker
    before = len(audit.entries())
    _, counts, _ = client.request("describe", 1, RUN, {}, None)
    assert counts == {"training-cases": 4, "test-cases": 2}
    weights = model_weights()
    new, metrics, notes = client.request("train", 1, RUN, {"server-round": 2,
                                                   "evaluate-incoming": True}, weights)
    assert notes == {}
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in weights.items()}
    assert not all(np.array_equal(new[k], weights[k]) for k in weights)
    assert set(metrics) == {"num-examples", "train-loss", "train-seconds", "train-steps",
                            "global-num-examples", "global-dice", "global-iou", "global-hd95",
                            "global-sensitivity", "global-specificity"}
    _, scores, _ = client.request("evaluate", 1, RUN, {"server-round": 2}, new)
    assert set(scores) == {"num-examples", "dice", "iou", "hd95", "sensitivity",
                           "specificity"}
    entries = audit.entries()[before:]
    assert [(e["kind"], e["outcome"], e["round"]) for e in entries] == [
        ("describe", "sent", None), ("train", "sent", 2), ("evaluate", "sent", 2)]
    assert entries[1]["weights_sha256"] == weights_hash(new)
    assert entries[1]["arrays"] == len(weights) and entries[1]["bytes"] > entries[1][
        "array_bytes"] > 0
    assert "global-dice" in entries[1]["metrics"] and entries[2]["weights_sha256"] is None


def test_the_worker_refuses_anything_outside_its_set(worker):
    client, audit, log, _ = worker
    weights = model_weights()
    with pytest.raises(WorkerRefused, match="unknown request 'read-file'"):
        client.request("read-file", 1, RUN, {}, None)
    wrong = dict(weights)
    first = next(iter(wrong))
    wrong[first] = np.zeros(3, dtype=np.float32)
    with pytest.raises(WorkerRefused, match=r"is float32 \(3,\), the run.s model has"):
        client.request("train", 1, RUN, {"server-round": 1}, wrong)
    with pytest.raises(WorkerRefused, match="not the run's model"):
        client.request("evaluate", 1, RUN, {}, {"x": np.zeros(2, np.float32)})
    with pytest.raises(WorkerRefused, match="strategy 'fedadam' is not allowed"):
        client.request("train", 1, {**RUN, "strategy": "fedadam"}, {}, weights)
    with pytest.raises(WorkerRefused, match="fewer rounds"):
        client.request("train", 1, {**RUN, "num-rounds": 9}, {}, weights)
    with pytest.raises(WorkerFailed, match="configuration error"):
        client.request("train", 1, {**RUN, "local-epochs": "many"}, {}, weights)
    refused = [e for e in audit.entries() if e["outcome"] == "refused"]
    assert {e["kind"] for e in refused} >= {"read-file", "train", "evaluate"}
    assert all(e["arrays"] == 0 and e["weights_sha256"] is None for e in refused)
    text = log.read_text()
    assert "refused read-file request" in text and "strategy 'fedadam' is not allowed" in text


def test_the_worker_counts_rounds_itself(worker):
    """max-rounds holds whatever the run declares: the worker counts what it trained."""
    client, *_ = worker
    weights = model_weights()
    for _ in range(3):
        client.request("train", 2, RUN, {"server-round": 1}, weights)
    with pytest.raises(WorkerRefused, match="fewer rounds"):
        client.request("train", 2, RUN, {"server-round": 1}, weights)


def test_a_malformed_frame_is_refused_and_the_worker_goes_on(worker):
    client, audit, _, sock = worker
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(b"\0\0\0\0\0\0\0\x05\0\0\0\0\0\0\0\0{oops")
        header, _, _ = recv_frame(s)
    assert header["ok"] is False and header["refused"] is True
    assert client.request("describe", 1, RUN, {}, None)[1]["test-cases"] == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_only_the_allowed_users_may_connect(worker):
    """The socket is 0600; even a user who could reach it is turned away by its uid."""
    _, _, log, sock = worker
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    nobody = pwd.getpwnam("nobody")
    os.chmod(sock, 0o666)  # as if its permissions had been loosened
    for folder in [sock.parent, *sock.parent.parents]:  # and its folders open to all
        os.chmod(folder, folder.stat().st_mode | 0o005)
    try:
        code = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
                "s.sendall(b'x' * 16); print(repr(s.recv(10)))")
        out = subprocess.run([sys.executable, "-c", code, str(sock)], user=nobody.pw_uid,
                             group=nobody.pw_gid, extra_groups=[], capture_output=True,
                             text=True, timeout=30, cwd="/")
    finally:
        os.chmod(sock, 0o600)
    # closed without a reply (a reset, when the request was left unread)
    assert out.stdout.strip() == "b''" or any(
        e in out.stderr for e in ("ConnectionResetError", "BrokenPipeError")), out.stderr
    assert f"refused a connection from uid {nobody.pw_uid}" in log.read_text()


def test_the_clientapp_imports_no_torch_and_no_monai():
    code = ("import sys, client.app; bad = [m for m in ('torch', 'monai') if m in sys.modules];"
            "sys.exit(bool(bad))")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_a_mistyped_policy_is_refused_with_the_key():
    with pytest.raises(ConfigError, match="did you mean 'require-dp'"):
        SitePolicy.from_dict({"require-pd": True})
    with pytest.raises(ConfigError, match="max-rounds must be int"):
        SitePolicy.from_dict({"max-rounds": "ten"})
    policy = SitePolicy.from_dict({"require-secure-aggregation": True, "max-epsilon": 4.0})
    plain = RunSettings.from_run_config({})
    assert policy.violations(plain) == ["secure aggregation is required",
                                        "differential privacy is required"]
    ok = RunSettings.from_run_config({"secure-aggregation": True, "dp": "client-fixed",
                                      "dp-max-epsilon": 3.0})
    assert policy.violations(ok) == []


def test_the_prompt_grid_returns_each_reply_as_it_comes():
    """Flower's deployment grid looks for replies every 3 s; the ServerApp's
    grid looks after 50 ms and at most every 250 ms, and stops at its timeout."""
    from server.prompt_grid import PromptGrid

    class Slow:
        def __init__(self):
            self.ready_at: dict[str, float] = {}

        def push_messages(self, messages):
            now = time.monotonic()
            self.ready_at = {m: now + d for m, d in messages}
            return list(self.ready_at)

        def pull_messages(self, ids):
            now = time.monotonic()

            class Reply:
                def __init__(self, i):
                    self.metadata = type("M", (), {"reply_to_message_id": i})()
            return [Reply(i) for i in ids if self.ready_at[i] <= now]

    grid = PromptGrid(Slow())
    start = time.monotonic()
    replies = grid.send_and_receive([("a", 0.3), ("b", 0.6)], timeout=10)
    took = time.monotonic() - start
    assert len(replies) == 2 and took < 0.9
    start = time.monotonic()
    replies = grid.send_and_receive([("a", 0.1), ("lost", 99)], timeout=1)
    assert len(replies) == 1 and 0.9 < time.monotonic() - start < 1.5


def test_a_policy_requiring_secure_aggregation_refuses_a_plain_run(synthetic_sites, tmp_path):
    """Through `fedseg node`'s own start-up: the worker it starts reads the
    hospital's policy; a plain run is refused with the rule, and recorded."""
    policy = tmp_path / "policy.toml"
    policy.write_text("require-secure-aggregation = true\n")
    sock, audit = tmp_path / "w.sock", tmp_path / "audit.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "client.worker", "--socket", str(sock), "--data-dir",
         str(synthetic_sites[1]), "--name", "hospital-b", "--audit", str(audit),
         "--policy", str(policy)], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        with pytest.raises(WorkerRefused, match="refused by the site's policy: secure "
                                                "aggregation is required"):
            WorkerClient(str(sock)).request("train", 5, RUN, {"server-round": 1},
                                            model_weights())
        secure = {**RUN, "secure-aggregation": True}
        _, metrics, _ = WorkerClient(str(sock)).request("describe", 5, secure, {}, None)
        assert metrics["training-cases"] == 4
    finally:
        stop_group(proc.pid)
    entries = AuditLog(audit).entries()
    assert [(e["kind"], e["outcome"]) for e in entries] == [("train", "refused"),
                                                            ("describe", "sent")]


def test_a_failure_while_training_is_a_failure_not_a_refusal(worker):
    """A request read whole whose work then fails (here an unusable round
    setting deep in training) is the site's failure, scrubbed to its type;
    only what cannot be read as a request is refused."""
    client, audit, _, _ = worker
    with pytest.raises(WorkerFailed) as err:
        client.request("train", 3, RUN, {"server-round": 1, "rounds-in-call": "x"},
                       model_weights())
    assert not isinstance(err.value, WorkerRefused)
    assert str(err.value) == "internal error (ValueError)"
    assert audit.entries()[-1]["outcome"] == "failed"


def test_a_run_cannot_make_the_worker_build_a_giant_model_or_batch(synthetic_sites):
    """What a hostile run config declares is bounded by the site, before
    anything is allocated: a U-Net of ~4e9 parameters, a batch of 10^9 voxels."""
    from client.service import SiteService
    from common.errors import scrub

    service = SiteService("hospital-a", synthetic_sites[0], device="cpu",
                          policy=SitePolicy())
    giant = {"model-channels": "512,1024,2048,4096,8192,16384", "patch-size": 64}
    start = time.monotonic()
    with pytest.raises(PolicyRefusal) as info:
        service.handle("describe", 9, giant, {}, None)
    assert scrub(info.value) == ("refused by the site's policy: a smaller model "
                                 "(model-channels, model-res-units) is required")
    assert time.monotonic() - start < 30  # counted on the meta device, not built
    with pytest.raises(PolicyRefusal, match="smaller training batches"):
        service.handle("describe", 9, {"batch-size": 250_000}, {}, None)
    relaxed = SitePolicy.from_dict({"max-batch-voxels": 2**40})
    assert relaxed.violations(RunSettings.from_run_config({"batch-size": 250_000})) == []
