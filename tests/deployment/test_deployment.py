"""A real deployment on 127.0.0.1: SuperLink and SuperNodes as processes, TLS,
node authentication, the real U-Net on synthetic DICOM hospitals.

Hospital b is a canary: a string planted in its DICOM headers, file names and
folder name, and one of its test cases broken, so its evaluation fails every
round. Its failure must be named by its site name from round 1, and the canary
must not reach any byte the server receives, any server-side log or state, or
the run folder. Set FEDSEG_CANARY to plant a string of your own."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pydicom
import pytest

from common.data.synthetic import write_federation
from server.deployment import base_env
from server.localfed import LocalFederation
from server.processes import free_port, stop_process_group
from server.provision import hospital_keypair
from server.runs import read_metrics
from server.wire import AUDIT_DIR_ENV
from tests.federation.conftest import FLOWER_PROCESSES, processes_matching

pytestmark = pytest.mark.federation

CANARY = os.environ.get("FEDSEG_CANARY") or "QZX-Canary-Doe^Jane-4471"
SAFE = CANARY.replace("/", "_").replace("\0", "_")  # what can stand in a file name


def plant(site: Path) -> Path:
    """Rename the site and its cases after the canary, write it into every
    DICOM header, and break one test case."""
    planted = site.with_name(f"ward-{SAFE}")
    site.rename(planted)
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        for case in sorted((planted / images).iterdir()):
            for dcm in sorted(case.iterdir()):
                ds = pydicom.dcmread(dcm)
                ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: any canary can be written
                ds.PatientName = CANARY
                ds.PatientID = CANARY
                ds.save_as(dcm)
                dcm.rename(case / f"{SAFE}_{dcm.name}")
            label = planted / labels / f"{case.name}.nii.gz"
            label.rename(planted / labels / f"{SAFE}_{case.name}.nii.gz")
            case.rename(case.with_name(f"{SAFE}_{case.name}"))
    broken = sorted(sorted((planted / "imagesTs").iterdir())[0].iterdir())[0]
    broken.write_bytes(broken.read_bytes()[:400])  # truncated: evaluation fails here
    return planted


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists()
            for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()]



@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    work = tmp_path_factory.mktemp("deploy")
    sites = write_federation(work / "data", 2, n_train=3, n_test=2, seed=2)
    before = set(processes_matching(*FLOWER_PROCESSES))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(AUDIT_DIR_ENV, str(work / "audit"))  # every reply the server receives
        with LocalFederation(work, [sites[0], plant(sites[1])]) as fed:
            yield fed
    left = {p: c for p, c in processes_matching(*FLOWER_PROCESSES).items() if p not in before}
    assert not left, f"processes left running: {left}"


def test_two_hospitals_train_over_tls_with_authenticated_nodes(federation):
    summary = federation.run("tls-run", {"num-rounds": 2, "local-epochs": 1}, timeout=400)
    run_dir = federation.state.runs / "tls-run"
    rows = read_metrics(run_dir)
    assert len(rows) == 2
    for row in rows:  # both train; b's evaluation fails, named by its site name
        assert row["trained"] == ["hospital-a", "hospital-b"]
        assert row["failures"] == ["evaluate at hospital-b: fedseg data error in case #0 "
                                   "(unreadable file)"]
    assert set(summary["final"]["sites"]) == {"hospital-a"}
    assert summary["final"]["sites"]["hospital-a"]["num-examples"] == 2
    assert summary["problems"] == ["site hospital-b failed every round (2 of 2)"]
    for name in ("summary.json", "final_model.pt", "dice.png"):
        assert (run_dir / name).exists()
    assert json.loads((run_dir / "summary.json").read_text()) == summary


def test_the_canary_never_reaches_the_server(federation):
    if not (federation.state.runs / "tls-run").exists():
        federation.run("tls-run", {"num-rounds": 1}, timeout=400)
    needles = {CANARY.encode(), SAFE.encode(), CANARY.lower().encode()}
    received = files_under(federation.work / "audit")
    assert len(received) >= 4  # train and evaluate replies from both sites
    server_side = received + files_under(federation.state.root,
                                         federation.work / "superlink.out")
    assert federation.state.runs / "tls-run" in [p.parent for p in server_side]
    leaks = [str(p) for p in server_side if any(n in p.read_bytes() for n in needles)]
    assert leaks == []
    # The hospital's own log has the details: the check above is not vacuous.
    assert SAFE in (federation.work / "node-hospital-b.out").read_text()


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
