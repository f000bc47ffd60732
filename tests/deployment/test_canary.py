"""Nothing identifying leaves a site: a canary string planted in one hospital's
DICOM headers, file names and folder name, with that hospital hitting an error,
must not reach any byte the server receives, any server-side log or state, or
the run folder. Set FEDSEG_CANARY to plant a string of your own."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

from common.data.synthetic import write_federation
from server.localfed import LocalFederation
from server.wire import AUDIT_DIR_ENV

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


def test_canary_never_reaches_the_server(tmp_path, monkeypatch):
    sites = write_federation(tmp_path / "data", 2, n_train=3, n_test=2, seed=3)
    canary_site = plant(sites[1])
    audit = tmp_path / "audit"
    monkeypatch.setenv(AUDIT_DIR_ENV, str(audit))
    work = tmp_path / "fed"
    with LocalFederation(work, [sites[0], canary_site]) as fed:
        summary = fed.run("canary", {"num-rounds": 1}, timeout=400)

    run_dir = fed.state.runs / "canary"
    failures = (run_dir / "metrics.jsonl").read_text()
    assert "evaluate at hospital-b" in failures and "unreadable file" in failures
    assert set(summary["final"]["sites"]) == {"hospital-a"}  # b's evaluation failed

    needles = {CANARY.encode(), SAFE.encode(), CANARY.lower().encode()}
    received = files_under(audit)
    assert len(received) >= 4  # train and evaluate replies from both sites
    server_side = received + files_under(fed.state.root, work / "superlink.out")
    assert run_dir in [p.parent for p in server_side]
    leaks = [str(p) for p in server_side if any(n in p.read_bytes() for n in needles)]
    assert leaks == []
    # The hospital's own log has the details: the check above is not vacuous.
    assert SAFE in (work / "node-hospital-b.out").read_text()
