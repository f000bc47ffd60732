"""A real deployment on 127.0.0.1: SuperLink and SuperNodes as processes, TLS,
node authentication, the real U-Net on synthetic DICOM hospitals.

Hospital b is a canary: a string planted in its DICOM headers, file names and
folder name, and every one of its test cases broken (each is left out, named
in b's own log), so its evaluation fails every round. Its failure must be
named by its site name from round 1, and the canary must not reach any byte
the server receives, any server-side log or state, or the run folder. Set
FEDSEG_CANARY to plant a string of your own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from common.data.synthetic import write_federation
from common.keys import hospital_keypair
from common.processes import base_env
from server.processes import free_port, stop_process_group
from server.runs import read_metrics
from server.simulation import APP_DIR
from tests.deployment.conftest import audited_federation
from tests.grid import audited_replies

pytestmark = pytest.mark.federation

CANARY = os.environ.get("FEDSEG_CANARY") or "QZX-Canary-Doe^Jane-4471"
SAFE = CANARY.replace("/", "_").replace("\0", "_")  # what can stand in a file name


def plant(site: Path) -> Path:
    """Rename the site and its cases after the canary, write it into every
    DICOM header, and break every test case."""
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
    for case in (planted / "imagesTs").iterdir():  # truncated: no usable test case
        broken = sorted(case.iterdir())[0]
        broken.write_bytes(broken.read_bytes()[:400])
    return planted


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists()
            for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()]



@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    work = tmp_path_factory.mktemp("deploy")
    sites = write_federation(work / "data", 2, n_train=3, n_test=2, seed=2)
    with audited_federation(work, [sites[0], plant(sites[1])],
                            policies={"hospital-a": "share-local-model = true\n"}) as fed:
        yield fed


def test_two_hospitals_train_over_tls_with_authenticated_nodes(federation):
    summary = federation.run("tls-run", {"num-rounds": 2, "local-epochs": 1,
                                         "cross-site": True}, timeout=400)
    run_dir = federation.state.runs / "tls-run"
    rows = read_metrics(run_dir)
    assert len(rows) == 2
    for row in rows:  # both train; b's evaluation fails, named by its site name
        assert row["trained"] == ["hospital-a", "hospital-b"]
        assert row["failures"] == ["evaluate at hospital-b: fedseg data error (no usable "
                                   "test case: 2 left out, 2 (unreadable file))"]
    assert set(summary["final"]["sites"]) == {"hospital-a"}
    assert summary["final"]["sites"]["hospital-a"]["num-examples"] == 2
    assert summary["problems"] == ["site hospital-b failed every round (2 of 2)"]
    # cross-site: only hospital-a's policy lets its local model be scored elsewhere;
    # hospital-b cannot score any model (its test cases are broken)
    assert list(summary["cross_site"]) == ["global", "local hospital-a"]
    assert list(summary["cross_site"]["local hospital-a"]) == ["hospital-a"]
    for name in ("summary.json", "final_model.pt", "dice.png", "report.html"):
        assert (run_dir / name).exists()
    assert json.loads((run_dir / "summary.json").read_text()) == summary


def test_the_deployment_gives_what_the_simulation_gives(federation, tmp_path):
    """Same sites, seeds and settings: the deployed run (site workers behind
    Flower's SuperNodes) and the same run on the in-process grid (the same
    site service in process) give the same metrics, round by round."""
    import torch

    from tests.grid import federation as grid_of
    from tests.grid import run_server

    if not (federation.state.runs / "tls-run").exists():
        federation.run("tls-run", {"num-rounds": 2, "local-epochs": 1, "cross-site": True},
                       timeout=400)
    deployed = read_metrics(federation.state.runs / "tls-run")
    threads = torch.get_num_threads()
    torch.set_num_threads(federation.threads)  # as each worker: the same sums, same order
    try:
        run_server(grid_of(list(zip(federation.names, federation.sites, strict=True)),
                           {"num-rounds": 2, "local-epochs": 1, "run-name": "same"}), tmp_path)
    finally:
        torch.set_num_threads(threads)
    simulated = read_metrics(tmp_path / "same")
    assert len(deployed) == len(simulated) == 2
    for d, s in zip(deployed, simulated, strict=True):
        assert d["dice"].keys() == s["dice"].keys() == {"hospital-a"}
        assert d["dice"]["hospital-a"] == pytest.approx(s["dice"]["hospital-a"], abs=1e-4)
        assert d["train_loss_sites"].keys() == s["train_loss_sites"].keys()
        for site, loss in d["train_loss_sites"].items():
            assert loss == pytest.approx(s["train_loss_sites"][site], abs=1e-4)
        assert d["failures"] == s["failures"] and d["trained"] == s["trained"]


@pytest.mark.slow
def test_secure_aggregation_and_client_dp_work_through_the_site_workers(federation):
    """SecAgg+ with client-side DP clipping, deployed: each hospital's worker
    trains, its ClientApp clips and masks what the worker returned, the server
    sees only masked uploads and the sum, and spends privacy per round."""
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    for old in (federation.work / "audit").glob("*secagg*"):
        old.unlink()
    summary = federation.run("secure-dp", {"num-rounds": 2, "local-epochs": 1,
                                           "secure-aggregation": True, "dp": "client-fixed",
                                           "dp-noise-multiplier": 0.5,
                                           "dp-clipping-norm": 5.0}, timeout=600)
    rows = read_metrics(federation.state.runs / "secure-dp")
    assert len(rows) == 2
    for row in rows:
        assert set(row["train_loss_sites"]) == {"hospital-a", "hospital-b"}
        assert row["aggregated"]
    assert [r["epsilon"] > 0 for r in rows] == [True, True]
    assert rows[1]["epsilon"] > rows[0]["epsilon"]
    assert summary["privacy"]["dp"] == "client-fixed"
    uploads = 0
    for msg in audited_replies(federation.work / "audit", "round0001-secagg*"):
        assert all(len(rec) == 0 for rec in msg.content.array_records.values())
        if any(Key.MASKED_PARAMETERS in cfg for cfg in msg.content.config_records.values()):
            uploads += 1
    assert uploads == 2


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


@pytest.mark.slow  # 15 s: the default suite's budget
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


# -- from outside: only the Fleet API answers on the public port ----------------------

def flwr_as(federation, home: Path, address: str, *args: str) -> subprocess.CompletedProcess:
    """The flwr CLI with a connection of its own to ``address`` (the federation's
    CA certificate, which every hospital holds, is all it has)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "x"\n\n[superlink.x]\n'
        f'address = "{address}"\nroot-certificates = "{federation.certs / "ca" / "ca.crt"}"\n')
    return subprocess.run(["flwr", *args, "--format", "json"], capture_output=True, text=True,
                          timeout=120, env=base_env({"FLWR_HOME": str(home)}))


def succeeded(proc: subprocess.CompletedProcess) -> bool:
    try:
        return bool(json.loads(proc.stdout).get("success"))
    except ValueError:
        return False


@pytest.mark.slow  # with the drills: keeps the default suite under 8 min (issue 27 added ~70 s)
def test_outside_the_flwr_cli_gets_nothing_but_locally_it_works(federation, tmp_path):
    public, local = federation.address, f"127.0.0.1:{federation.local_port}"
    hospital_keypair(tmp_path, "intruder")
    calls = [("ls",), ("supernode", "list"),
             ("supernode", "register", str(tmp_path / "intruder.pub"))]
    for call in calls:
        outside = flwr_as(federation, tmp_path / "out", public, *call[:1], *call[1:], "x")
        assert not succeeded(outside), (call, outside.stdout[-500:])
    submitted = flwr_as(federation, tmp_path / "out", public, "run", str(APP_DIR), "x")
    assert not succeeded(submitted) and "run-id" not in submitted.stdout
    for call in calls[:2]:  # the coordinator's own address answers
        inside = flwr_as(federation, tmp_path / "in", local, *call, "x")
        assert succeeded(inside), (call, inside.stdout[-500:] + inside.stderr[-500:])
    listed = json.loads(flwr_as(federation, tmp_path / "in", local, "supernode", "list",
                                "x").stdout)
    assert len(listed["nodes"]) == 2  # the intruder's key was not registered


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/control/list-runs"), ("POST", "/v1/control/register-node"),
    ("POST", "/v1/control/start-run"), ("POST", "/v1/runtime/pull-messages"),
    ("POST", "/v1/runtime/push-messages"), ("POST", "/v1/fleet/register-node"),
    ("GET", "/v1/fleet/pull-messages"), ("GET", "/"), ("POST", "/v1/fleet/../control/list-runs"),
    ("POST", "/v1/fleet/pull-messages/../../control/list-runs"),
])
def test_outside_plain_https_gets_403_but_fleet_calls_pass(federation, method, path):
    import httpx

    ca = str(federation.certs / "ca" / "ca.crt")
    with httpx.Client(verify=ca, timeout=30) as client:
        outside = client.request(method, f"https://{federation.address}{path}",
                                 content=b"\0" * 16)
        assert outside.status_code == 403, (path, outside.status_code, outside.text[:200])
        # A Fleet call passes the proxy (the SuperLink itself answers, refusing an
        # unsigned request): the refusals above are the proxy's, not the SuperLink's.
        fleet = client.post(f"https://{federation.address}/v1/fleet/pull-messages",
                            content=b"\0" * 16)
        assert fleet.status_code != 403 and "nginx" not in fleet.text
        # The same Control call on the coordinator's local address reaches Flower.
        local = client.post(f"https://localhost:{federation.local_port}/v1/control/list-runs",
                            content=b"")
        assert local.status_code != 403


@pytest.mark.slow  # 30 s: the default suite's budget
def test_hospital_list_shows_a_key_registered_behind_fedsegs_back(federation, tmp_path):
    """A key registered on the local address without `fedseg hospital register`
    (by hand, or by whoever had the Control API before it was closed) is listed
    as unknown with the way to remove it, and removing it by node id works."""
    hospital_keypair(tmp_path, "stray")
    home = federation.state.flwr_home
    out = subprocess.run(["flwr", "supernode", "register", str(tmp_path / "stray.pub"), "fedseg",
                          "--format", "json"], capture_output=True, text=True, timeout=120,
                         env=base_env({"FLWR_HOME": str(home)}))
    stray = str(json.loads(out.stdout)["node-id"])

    def fedseg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "server.cli", "hospital", *args,
                               "--state", str(federation.state.root)], capture_output=True,
                              text=True, timeout=120, cwd=APP_DIR, env=base_env())

    listed = fedseg("list")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    text = " ".join(listed.stdout.split())
    assert "(unknown)" in text and f"fedseg hospital remove {stray}" in text
    assert "hospital-a" in text and "hospital-b" in text
    removed = fedseg("remove", stray)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert "(unknown)" not in fedseg("list").stdout


def test_the_site_audit_lists_every_reply(federation):
    """`fedseg node audit` at the hospital: every reply its worker produced."""
    if not (federation.state.runs / "tls-run").exists():
        federation.run("tls-run", {"num-rounds": 2, "local-epochs": 1, "cross-site": True},
                       timeout=400)
    state = next(federation.work.glob("site-hospital-a-*"))
    out = subprocess.run([sys.executable, "-m", "server.cli", "node", "audit", "--state",
                          str(state)], capture_output=True, text=True, timeout=120,
                         cwd=APP_DIR, env=base_env({"COLUMNS": "250"}))
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if " sent " in line]
    kinds = [("train" in r, "evaluate" in r) for r in rows]
    assert kinds.count((True, False)) >= 2 and kinds.count((False, True)) >= 1, out.stdout


def test_each_hospital_keeps_the_final_model_in_its_own_state(federation):
    """At the end of a run the site worker keeps the final model and its card
    in the site's state (not the data folder); `fedseg node models` lists it;
    `fedseg predict` can use it as it is."""
    import torch

    if not (federation.state.runs / "tls-run").exists():
        federation.run("tls-run", {"num-rounds": 2, "local-epochs": 1, "cross-site": True},
                       timeout=400)
    final = torch.load(federation.state.runs / "tls-run" / "final_model.pt", weights_only=True)
    for name in ("hospital-a", "hospital-b"):
        state = next(federation.work.glob(f"site-{name}-*"))
        kept = state / "models" / "tls-run"
        card = json.loads((kept / "model-card.json").read_text())
        assert card["site"] == name and card["rounds"] == 2
        weights = torch.load(kept / "final_model.pt", weights_only=True)
        assert all(torch.equal(weights[k], final[k]) for k in final)
        out = subprocess.run([sys.executable, "-m", "server.cli", "node", "models", "--state",
                              str(state)], capture_output=True, text=True, timeout=120,
                             cwd=APP_DIR, env=base_env({"COLUMNS": "250"}))
        assert out.returncode == 0 and "tls-run" in out.stdout and card["sha256"][:16] in \
            out.stdout, out.stdout + out.stderr
    assert not any("final_model" in p.name for site in federation.sites
                   for p in site.rglob("*"))  # never in the data folder
