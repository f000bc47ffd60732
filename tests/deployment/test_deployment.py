"""A real deployment on 127.0.0.1: SuperLink and SuperNodes as processes, TLS,
node authentication, the real U-Net on synthetic DICOM hospitals."""

from __future__ import annotations

import subprocess

import pytest

from common.data.synthetic import write_federation
from server.deployment import base_env
from server.localfed import LocalFederation
from server.processes import free_port, stop_process_group
from server.provision import hospital_keypair
from tests.federation.conftest import FLOWER_PROCESSES, processes_matching

pytestmark = pytest.mark.federation


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    work = tmp_path_factory.mktemp("deploy")
    sites = write_federation(work / "data", 2, n_train=3, n_test=2, seed=2)
    before = set(processes_matching(*FLOWER_PROCESSES))
    with LocalFederation(work, sites) as fed:
        yield fed
    left = {p: c for p, c in processes_matching(*FLOWER_PROCESSES).items() if p not in before}
    assert not left, f"processes left running: {left}"


def test_two_hospitals_train_over_tls_with_authenticated_nodes(federation):
    summary = federation.run("tls-run", {"num-rounds": 2, "local-epochs": 1}, timeout=400)
    rows = [line for line in (federation.state.runs / "tls-run" / "metrics.jsonl")
            .read_text().splitlines()]
    assert len(rows) == 2
    assert set(summary["final"]["sites"]) == {"hospital-a", "hospital-b"}
    for site in summary["final"]["sites"].values():
        assert site["num-examples"] == 2 and 0.0 <= site["dice"] <= 1.0
    for name in ("summary.json", "final_model.pt", "dice.png"):
        assert (federation.state.runs / "tls-run" / name).exists()


def test_an_unregistered_key_is_refused(federation, tmp_path):
    hospital_keypair(tmp_path, "intruder")
    node = federation.start_node("intruder", federation.sites[0], log="intruder.out",
                                 port=free_port(), key=tmp_path / "intruder.key")
    assert node.wait(timeout=120) != 0
    out = (federation.work / "intruder.out").read_text()
    assert "key is not registered" in out


def test_a_node_without_tls_is_refused(federation):
    node = federation.start_node("plain", federation.sites[0], log="plain.out",
                                 port=free_port(), insecure=True)
    assert node.wait(timeout=120) != 0
    assert "requires TLS" in (federation.work / "plain.out").read_text()


def test_the_superlink_itself_refuses_plaintext(federation):
    """Past fedseg's own check: Flower's SuperNode without TLS cannot connect."""
    log = federation.work / "flower-plain.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["flower-supernode", "--superlink", federation.address, "--insecure",
             "--port", str(free_port()), "--max-retries", "1", "--max-wait-time", "10"],
            stdout=out, stderr=subprocess.STDOUT, env=base_env(), start_new_session=True)
    try:
        code = proc.wait(timeout=120)
    finally:
        stop_process_group(proc)  # its flower-superexec helper can outlive it
    assert code != 0
    assert "could not establish a connection" in log.read_text()
