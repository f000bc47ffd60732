"""The ClientApp's handlers, called directly with built messages: what leaves a site."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.serde import message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from client.app import evaluate_handler, train_handler
from common.config import RunSettings
from common.data.site import list_cases
from common.errors import LOCAL_LOG_ENV, parse_error_reason
from common.model import build_model
from common.packing import pack, template_of, unpack
from common.wire import EVAL_METRICS, TRAIN_METRICS

RUN_CONFIG = {"local-epochs": 1, "seed": 0}


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def context(data_dir: Path, name: str = "hospital-a") -> Context:
    return Context(run_id=1, node_id=7, node_config={"data-dir": str(data_dir), "site-name": name},
                   state=RecordDict(), run_config=dict(RUN_CONFIG))


def received(reply: Message, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A train reply's weights unpacked to the model's state dict."""
    packed = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    assert set(packed) == {"weights-float32"}  # one flat vector, nothing else
    return {k: torch.from_numpy(v.copy())
            for k, v in unpack(packed, template_of(model.state_dict())).items()}


def message(kind: str, model: torch.nn.Module) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in
                                                 pack(model.state_dict()).items()}),
                          "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=7, message_type=kind)


def wire_bytes(reply: Message) -> bytes:
    return message_to_proto(reply).SerializeToString()


def secrets_of(site: Path) -> list[bytes]:
    """Strings that would identify the site's data if they left it."""
    cases = list_cases(site, "training") + list_cases(site, "test")
    values = [str(site), site.name, "SYNTHETIC^", "SYN-"]
    values += [c.case_id for c in cases] + [c.image.name for c in cases]
    return [v.encode() for v in values]


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(RunSettings.from_run_config(RUN_CONFIG).model)


def test_train_reply_holds_weights_and_named_numbers_only(synthetic_sites, model):
    site = synthetic_sites[1]
    reply = train_handler(message(MessageType.TRAIN, model), context(site))
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"arrays", "metrics", "site"}
    assert set(reply.content["metrics"].keys()) == set(TRAIN_METRICS)
    assert reply.content["metrics"]["num-examples"] == len(list_cases(site, "training"))
    assert dict(reply.content["site"]) == {"name": "hospital-a"}
    arrays = received(reply, model)
    before = model.state_dict()
    assert arrays.keys() == before.keys()
    assert all(arrays[k].shape == before[k].shape for k in before)
    assert any(not torch.equal(arrays[k], before[k]) for k in before)  # it trained
    raw = wire_bytes(reply)
    assert not [s for s in secrets_of(site) if s in raw]


def test_evaluate_reply_holds_aggregate_metrics_only(synthetic_sites, model):
    site = synthetic_sites[0]
    reply = evaluate_handler(message(MessageType.EVALUATE, model), context(site))
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"metrics", "site"}
    metrics = reply.content["metrics"]
    assert set(metrics.keys()) == set(EVAL_METRICS)
    assert metrics["num-examples"] == len(list_cases(site, "test"))
    assert 0.0 <= metrics["dice"] <= 1.0
    assert not reply.content.array_records  # no weights, no per-case numbers
    raw = wire_bytes(reply)
    assert not [s for s in secrets_of(site) if s in raw]


def test_a_failing_site_sends_a_scrubbed_error(tmp_path, model):
    site = tmp_path / "DOE_JANE_1961"
    (site / "imagesTr").mkdir(parents=True)
    (site / "imagesTr" / "DOE_JANE_ct.nii.gz").write_bytes(b"not a nifti")
    (site / "labelsTr").mkdir()
    (site / "labelsTr" / "DOE_JANE_ct.nii.gz").write_bytes(b"not a nifti")
    reply = train_handler(message(MessageType.TRAIN, model), context(site))
    assert reply.has_error()
    assert parse_error_reason(reply.error.reason) == (
        "hospital-a", "fedseg data error (no usable training case: 1 left out, 1 (unreadable "
                      "file))")
    assert b"DOE" not in wire_bytes(reply)


def test_in_a_simulation_the_full_cause_goes_to_the_local_log(tmp_path, model, monkeypatch):
    """Every party of a simulation is the user's own machine: the site's own
    error, with the case's name, is written where `fedseg simulate` shows it;
    the reply still carries only the scrubbed form."""
    site = tmp_path / "site"
    (site / "imagesTr").mkdir(parents=True)
    (site / "imagesTr" / "case_7.nii.gz").write_bytes(b"not a nifti")
    (site / "labelsTr").mkdir()
    (site / "labelsTr" / "case_7.nii.gz").write_bytes(b"not a nifti")
    local_log = tmp_path / "local.log"
    monkeypatch.setenv(LOCAL_LOG_ENV, str(local_log))
    reply = train_handler(message(MessageType.TRAIN, model), context(site))
    assert "case_7" not in reply.error.reason
    line = local_log.read_text()
    assert line.startswith("hospital-a: train failed:") and "case_7" in line


def test_the_data_folder_comes_from_node_config_not_run_config(synthetic_sites, model):
    ctx = context(synthetic_sites[0])
    ctx.run_config["data-dir"] = "/nonexistent"  # ignored: run config is not per site
    reply = evaluate_handler(message(MessageType.EVALUATE, model), ctx)
    assert not reply.has_error()


def test_mismatched_model_is_a_scrubbed_error(synthetic_sites):
    other = build_model(RunSettings.from_run_config({"model-channels": "8,16"}).model)
    reply = train_handler(message(MessageType.TRAIN, other), context(synthetic_sites[0]))
    assert reply.has_error()
    reason = parse_error_reason(reply.error.reason)[1]
    assert reason == ("request refused by the site: weight 'weights-float32' is float32 "
                      f"({sum(v.numel() for v in other.state_dict().values())},), the run's "
                      "model has float32 (1625161,)")


def test_a_site_keeps_its_optimiser_state_between_rounds_and_never_sends_it(
        synthetic_sites, model):
    """keep-optimizer-state: Adam's moments stay in the node's own context and
    the next round continues from them (its step count goes on); they are not
    in the reply. Switched off, nothing is kept."""
    from client.app import OPTIMIZER_STATE

    site = synthetic_sites[0]
    ctx = context(site)
    ctx.run_config["keep-optimizer-state"] = True
    first = train_handler(message(MessageType.TRAIN, model), ctx)
    steps = int(first.content["metrics"]["train-steps"])
    kept = ctx.state.array_records[OPTIMIZER_STATE]
    assert float(kept["0.step"].numpy()) == steps
    assert set(first.content.keys()) == {"arrays", "metrics", "site"}
    assert received(first, model).keys() == model.state_dict().keys()  # weights only

    second = train_handler(message(MessageType.TRAIN, model), ctx)
    assert float(ctx.state.array_records[OPTIMIZER_STATE]["0.step"].numpy()) == 2 * steps
    off = context(site)
    off.run_config["keep-optimizer-state"] = False
    fresh = train_handler(message(MessageType.TRAIN, model), off)
    assert OPTIMIZER_STATE not in off.state.array_records
    # The same global weights, data and seed: only the carried moments differ.
    a = received(second, model)
    b = received(fresh, model)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_simulation_worker_holds_one_sites_cases_at_a_time(synthetic_sites, model,
                                                            tmp_path, monkeypatch):
    """A simulation's worker process answers for many sites one after another:
    another site's message drops the last site's service and prepared cases
    before its own are read, and each message leaves a line in the worker log
    saying so (sites held now and at most, process, peak memory). Of the
    site it left it keeps only the handles of the cases on disk (no array),
    so coming back to it reads none of its cases again."""
    import json

    from common.config import SIM_WORKERS_ENV
    from common.data import cache

    log = tmp_path / "workers.jsonl"
    monkeypatch.setenv(SIM_WORKERS_ENV, str(log))
    cache.clear()
    reads = []
    real_read = cache.read_site
    monkeypatch.setattr(cache, "read_site", lambda d, split, **kw: (
        reads.append((Path(d).name, split)), real_read(d, split, **kw))[1])
    a, b = synthetic_sites[0], synthetic_sites[1]
    ctx_a, ctx_b = context(a, "hospital-a"), context(b, "hospital-b")
    ctx_b.node_id = 8
    train_handler(message(MessageType.TRAIN, model), ctx_a)
    assert cache.folders_held() == [str(a.resolve())] and cache.folders_parked() == []
    evaluate_handler(message(MessageType.EVALUATE, model), ctx_b)
    assert cache.folders_held() == [str(b.resolve())]  # site a's cases are gone
    assert cache.folders_parked() == [str(a.resolve())]  # but for their handles
    parked = [c for k, (_, cases, _) in cache._cache.items() if k[0] == str(a.resolve())
              for c in cases]
    assert parked and all(type(c).__name__ == "StoredCase" and not vars(c).get("image")
                          for c in parked)
    train_handler(message(MessageType.TRAIN, model), ctx_a)
    assert cache.folders_held() == [str(a.resolve())]
    assert cache.folders_parked() == [str(b.resolve())]
    assert reads == [(a.name, "training"), (b.name, "test")]  # a's cases not read again
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(x["site"], x["kind"], x["ok"], x["round"]) for x in lines] == [
        ("hospital-a", "train", True, 1), ("hospital-b", "evaluate", True, 1),
        ("hospital-a", "train", True, 1)]
    assert all(x["sites_held"] == 1 and x["pid"] > 0 and x["peak_rss_mb"] > 0 for x in lines)
    assert [x["sites_parked"] for x in lines] == [0, 1, 1]
    cache.clear()


def test_a_sites_parked_handles_are_bounded_and_a_changed_case_is_read_again(tmp_path,
                                                                            monkeypatch):
    """At most ``MAX_PARKED`` lists of handles, and ``MAX_PARKED_FILES``
    files among them, stay, the oldest going first; a node that serves no
    simulation keeps its ``MAX_ENTRIES`` as before; a parked site whose files
    changed is read again when it is served."""
    import os

    from common.data import cache
    from common.data.synthetic import write_federation

    cache.clear()
    folders = write_federation(tmp_path / "sites", 3, n_train=2, n_test=1, seed=5)
    store = tmp_path / "prepared"

    def serve(folder, split="training"):
        cache.keep_only(folder)
        return cache.load_prepared(folder, split, "grey", store=store / folder.name)[0]

    monkeypatch.setattr(cache, "MAX_PARKED", 1)
    for f in folders:
        serve(f)
    assert cache.folders_held() == [str(folders[2].resolve())]
    assert cache.folders_parked() == [str(folders[1].resolve())]  # folders[0] went
    monkeypatch.setattr(cache, "MAX_PARKED", 16)
    monkeypatch.setattr(cache, "MAX_PARKED_FILES", 1)  # fewer than one site's files
    serve(folders[0])
    assert cache.folders_parked() == []
    monkeypatch.undo()

    image = next(p for p in sorted((folders[1] / "imagesTr").rglob("*")) if p.is_file())
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    serve(folders[2])
    serve(folders[1])
    assert cache.last_store_read["reused"] == 1 and cache.last_store_read["written"] == 1

    cache.clear()  # a hospital's node: no site served, every entry held, 4 at most
    for f in folders:
        for split in ("training", "test"):
            cache.load_prepared(f, split, "grey", store=store / f.name)
    assert len(cache._cache) == cache.MAX_ENTRIES and cache.folders_parked() == []
    cache.clear()


def test_a_parked_handle_whose_stored_files_were_replaced_is_not_served(tmp_path):
    """Another process may prepare a parked site's case again (its worker
    served the site meanwhile); where the source files came back with their
    old sizes and times, only the stored files' stamps tell: the handle made
    from the replaced files is not served, the store is read again."""
    import os

    from common.data import cache
    from common.data.synthetic import write_federation

    cache.clear()
    a, b = write_federation(tmp_path / "sites", 2, n_train=2, n_test=1, seed=5)
    store = tmp_path / "prepared"

    def serve(folder):
        cache.keep_only(folder)
        return cache.load_prepared(folder, "training", "grey", store=store / folder.name)[0]

    first = serve(a)
    serve(b)
    label = first[0]._store.path(first[0]._key, "label")
    st = label.stat()
    copy = label.with_name("replaced.tmp")
    copy.write_bytes(label.read_bytes())
    os.replace(copy, label)  # as the store writes: a new file under the old name
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = serve(a)
    assert again[0] is not first[0] and again[1] is not first[1]
    assert cache.last_store_read["reused"] == len(first)
    serve(b)
    assert serve(a)[0] is again[0]  # untouched, the parked handles are served as they are
    cache.clear()


def test_simulated_sites_of_one_name_from_two_folders_keep_apart_state(
        synthetic_sites, model, tmp_path, monkeypatch):
    """``hippo3/site-1`` and ``hippo20/site-1``: two simulated sites of one
    name keep their prepared cases and models in two state folders, where
    one folder named by the site's name alone held both; the same folder,
    reached through a link, is the same site."""
    from client.app import simulated_site_state

    monkeypatch.setenv("FEDSEG_HOME", str(tmp_path / "home"))
    a, b = synthetic_sites[0], synthetic_sites[1]
    linked = tmp_path / "linked"
    linked.symlink_to(a, target_is_directory=True)
    assert simulated_site_state("site-1", a) != simulated_site_state("site-1", b)
    assert simulated_site_state("site-1", linked) == simulated_site_state("site-1", a)
    assert simulated_site_state("site-1", a).name.startswith("site-1-")
    train_handler(message(MessageType.TRAIN, model), context(a, "site-1"))
    ctx_b = context(b, "site-1")
    ctx_b.node_id = 8
    train_handler(message(MessageType.TRAIN, model), ctx_b)
    states = sorted((tmp_path / "home" / "sites").iterdir())
    assert states == sorted([simulated_site_state("site-1", a),
                             simulated_site_state("site-1", b)])
    for state in states:  # each site's prepared cases in its own folder
        assert any((state / "prepared").rglob("index.json")), state


def test_a_site_never_writes_over_a_model_it_kept_under_the_same_run_name(tmp_path,
                                                                          monkeypatch):
    """Two runs of one name (every `fedseg bench quality` names its run
    'fedavg'): the second's model goes where the first's was, and the first
    moves to earlier-<its saved time>/ with its card, byte for byte. The same
    model kept again (a repeated request of one run and round) is written over."""
    import json

    import numpy as np

    from client.service import keep_model
    from common import wire

    settings = RunSettings.from_run_config({"run-name": "fedavg"})
    models = tmp_path / "state" / "models"  # a site's state, as `fedseg node` keeps it
    first = {"w": np.zeros(3, np.float32)}
    path = keep_model(models, "site-1", settings, first, {wire.SERVER_ROUND: 2}, {}, run_id=7)
    kept = path.read_bytes(), (path.parent / "model-card.json").read_text()
    assert keep_model(models, "site-1", settings, first, {wire.SERVER_ROUND: 2}, {},
                      run_id=7) == path
    assert list(path.parent.glob("earlier-*")) == []  # the same save again
    second = {"w": np.ones(3, np.float32)}
    keep_model(models, "site-1", settings, second, {wire.SERVER_ROUND: 2}, {}, run_id=8)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert json.loads((path.parent / "model-card.json").read_text())["flower_run_id"] == 8
    [aside] = path.parent.glob("earlier-*")
    assert ((aside / "final_model.pt").read_bytes(), (aside / "model-card.json").read_text()
            ) == kept
    third = {"w": np.full(3, 2, np.float32)}  # a third in the same second: its own folder
    keep_model(models, "site-1", settings, third, {wire.SERVER_ROUND: 2}, {}, run_id=9)
    assert len(list(path.parent.glob("earlier-*"))) == 2
    # fedseg node models lists the run's model, then the ones set aside
    from rich.console import Console

    import common.console
    from server.cli import main

    wide = Console(width=250, record=True)
    monkeypatch.setattr(common.console.console, "print", wide.print)
    assert main(["node", "models", "--state", str(tmp_path / "state")]) == 0
    listed = wide.export_text()
    rows = [line for line in listed.splitlines() if "fedavg" in line]
    assert len(rows) == 3, listed
    assert "(earlier)" not in rows[0] and all("fedavg (earlier)" in r for r in rows[1:])


def test_a_model_cards_saved_time_cannot_send_the_earlier_model_out_of_its_folder(tmp_path):
    """The folder an earlier model moves to is named from its card's 'saved'
    text: a card edited to hold a path still keeps it inside the run's folder."""
    import json

    import numpy as np

    from client.service import keep_model
    from common import wire

    settings = RunSettings.from_run_config({"run-name": "r"})
    path = keep_model(tmp_path, "s", settings, {"w": np.zeros(2, np.float32)},
                      {wire.SERVER_ROUND: 1}, {}, run_id=1)
    card = path.parent / "model-card.json"
    card.write_text(json.dumps({**json.loads(card.read_text()), "saved": "../../../etc/x"}))
    keep_model(tmp_path, "s", settings, {"w": np.ones(2, np.float32)},
               {wire.SERVER_ROUND: 1}, {}, run_id=2)
    [aside] = path.parent.glob("earlier-*")
    assert aside.parent == path.parent and aside.name == "earlier-etcx"
    assert sorted(p.name for p in tmp_path.rglob("final_model.pt")) == ["final_model.pt"] * 2
