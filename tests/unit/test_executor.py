"""The hospital's executor, message by message, in process: what the installed
fedseg answers, what it refuses, and the audit line of every reply that leaves.
(The executor against a real SuperNode: tests/deployment.)"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.run import Run

from client.audit import AuditLog
from client.executor import APP_ID, Handler
from client.policy import PolicyRefusal, SitePolicy
from client.privacy import SiteLedger
from client.service import SiteService
from common import wire
from common.config import ConfigError, RunSettings
from common.errors import parse_error_reason
from common.model import build_model
from common.packing import pack

ROOT = Path(__file__).resolve().parents[2]
RUN = {wire.VERSION_KEY: wire.VERSION, "local-epochs": 1, "seed": 0, "num-rounds": 3,
       "model-channels": "8,16", "patch-size": 32, "batch-size": 2, "patches-per-image": 1}
BUNDLE = "ab" * 32


@pytest.fixture(autouse=True)
def _task(task_identity):
    yield


def model_weights(run_config=RUN) -> dict[str, np.ndarray]:
    model = build_model(RunSettings.from_run_config(run_config).model)
    return pack(model.state_dict())  # as the wire carries it


def site(sites, tmp_path: Path, policy: str = "", name: str = "hospital-a"):
    """A handler on the first synthetic site, with the hospital's policy text."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(policy)
    rules = SitePolicy.load(policy_file)
    service = SiteService(name, sites[0], device="cpu", policy=rules,
                          models_dir=tmp_path / "models")
    audit = AuditLog(tmp_path / "audit" / "audit.jsonl")
    return Handler(service, rules, audit, SiteLedger(tmp_path / "privacy" / "ledger.json")), \
        audit


def message(kind: str = "train", server_round: int = 1, weights=None, **config) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": server_round, **config})})
    if weights is not False:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in
                                         (weights or model_weights()).items()})
    return Message(content=content, dst_node_id=7, message_type=kind,
                   group_id=str(server_round))


def answer(handler: Handler, msg: Message, run_config=RUN, run_id: int = 1,
           bundle: str = BUNDLE, fab_id: str = APP_ID, task_type: str = "flwr-clientapp"):
    run = Run.create_empty(run_id)
    run.fab_id, run.fab_hash = fab_id, bundle
    context = Context(run_id=run_id, node_id=7, node_config={}, state=RecordDict(),
                      run_config=dict(run_config))
    return handler.handle(msg, context, run, task_type)


def reason(outcome) -> str:
    return parse_error_reason(outcome.reply.error.reason)[1]


def test_train_and_evaluate_are_answered_and_each_reply_audited_as_it_leaves(
        synthetic_sites, tmp_path):
    handler, audit = site(synthetic_sites, tmp_path)
    trained = answer(handler, message("train", 2, **{"evaluate-incoming": True}))
    assert trained.outcome == "sent" and not trained.reply.has_error()
    reply = trained.reply
    assert set(reply.content.array_records) == {"arrays"}
    scored = answer(handler, message("evaluate", 2))
    assert set(scored.reply.content["metrics"]) == {"num-examples", "dice", "iou", "hd95",
                                                    "sensitivity", "specificity"}
    first, second = audit.entries()
    assert (first["kind"], first["outcome"], first["round"]) == ("train", "sent", 2)
    # the id the server receives the reply under: the SHA-256 of its content tree
    assert first["message_id"] == reply.object_id and len(first["message_id"]) == 64
    assert first["records"]["arrays"] == {"type": "arrays", "keys": ["weights-float32"]}
    assert "global-dice" in first["records"]["metrics"]["keys"]
    # the run names no structure: the site says the one its map names (wire 3)
    assert first["records"]["site"]["keys"] == ["name", "structure"]
    assert first["bytes"] > first["array_bytes"] > 0 and first["weights_sha256"]
    assert first["bundle"] == BUNDLE  # what allowed-bundles pins
    assert (second["kind"], second["arrays"], second["weights_sha256"]) == ("evaluate", 0,
                                                                            None)


@pytest.mark.parametrize(("config", "words"), [
    ({**RUN, wire.VERSION_KEY: 99}, "the run's app speaks fedseg wire version 99; this "
                                    "site's fedseg speaks 1, 2"),
    ({k: v for k, v in RUN.items() if k != wire.VERSION_KEY}, "speaks no fedseg wire version"),
    ({**RUN, wire.VERSION_KEY: "1"}, "speaks fedseg wire version 1;"),
])
def test_a_run_of_a_wire_version_this_site_does_not_speak_is_refused(
        synthetic_sites, tmp_path, config, words):
    handler, audit = site(synthetic_sites, tmp_path)
    out = answer(handler, message(), run_config=config)
    assert out.outcome == "refused" and words in reason(out)
    assert "CHANGELOG.md" in reason(out)
    assert audit.entries()[-1]["outcome"] == "refused" and words in audit.entries()[-1][
        "reason"]


def test_the_policy_pins_wire_versions_and_bundles(synthetic_sites, tmp_path):
    handler, audit = site(synthetic_sites, tmp_path,
                          f'allowed-bundles = ["{"cd" * 32}"]\n'
                          f'allowed-wire-versions = [{wire.VERSION}]\n')
    out = answer(handler, message(), bundle=BUNDLE)
    assert out.outcome == "refused"
    assert reason(out) == ("refused by the site's policy: the run's app bundle is not among "
                           "this site's allowed-bundles")
    assert answer(handler, message(), bundle="CD" * 32).outcome == "sent"
    other = answer(handler, message(), fab_id="someone/else")
    assert other.outcome == "refused" and "fedseg's app only" in reason(other)
    with pytest.raises(ConfigError, match="allowed-bundles must list SHA-256"):
        SitePolicy.from_dict({"allowed-bundles": ["abc"]})


def test_a_message_of_another_kind_is_refused(synthetic_sites, tmp_path):
    handler, audit = site(synthetic_sites, tmp_path)
    out = answer(handler, message("system"))
    assert out.outcome == "refused" and "message kind 'system' is not one" in reason(out)
    assert audit.entries()[-1]["kind"] == "system"
    agent = answer(handler, message(), task_type="flwr-agentapp")  # answered, never run
    assert agent.outcome == "refused" and "ClientApp messages only" in reason(agent)


@pytest.mark.parametrize("bad", [
    {"server-round": math.inf}, {"server-round": -1}, {"rounds-in-call": 10**6},
    {"rounds-done": "x"}, {"server-round": "1" * 10_000},
])
def test_malformed_instructions_get_an_audited_error_never_a_crash(synthetic_sites, tmp_path,
                                                                   bad):
    handler, audit = site(synthetic_sites, tmp_path)
    msg = message()
    msg.content["config"] = ConfigRecord({**dict(msg.content["config"]), **bad})
    out = answer(handler, msg)
    assert out.reply.has_error() and out.outcome in ("refused", "failed")
    line = audit.entries()[-1]
    assert line["outcome"] == out.outcome and line["message_id"] == out.reply.object_id
    assert len(reason(out)) < 400


def test_weights_that_are_not_the_runs_model_are_refused(synthetic_sites, tmp_path):
    handler, _ = site(synthetic_sites, tmp_path)
    weights = model_weights()
    first = next(iter(weights))
    out = answer(handler, message(weights={first: np.zeros(3, np.float32)}))
    assert out.outcome == "refused" and "the run's model has" in reason(out)
    assert answer(handler, message(weights=False)).outcome == "refused"


def test_a_policy_requiring_secure_aggregation_lets_nothing_unmasked_leave(
        synthetic_sites, tmp_path):
    """Against a plain run, and against a run that only claims SecAgg+ in its
    settings while its server sends plain training messages."""
    handler, audit = site(synthetic_sites, tmp_path, "require-secure-aggregation = true\n")
    plain = answer(handler, message())
    assert reason(plain) == "refused by the site's policy: secure aggregation is required"
    spoof = answer(handler, message(), run_config={**RUN, "secure-aggregation": True})
    assert spoof.outcome == "refused" and "no SecAgg+ stage" in reason(spoof)
    for line in audit.entries():
        assert line["outcome"] == "refused" and line["arrays"] == 0
    # evaluate carries no weights up: still answered
    assert answer(handler, message("evaluate"),
                  run_config={**RUN, "secure-aggregation": True}).outcome == "sent"


def test_the_site_noises_its_own_update_from_its_own_entropy(synthetic_sites, tmp_path):
    """require-dp: clipped to the run's norm, noised by the site; the noise is
    not the seed's (two identical runs differ), while without it they agree."""
    dp = {**RUN, "dp": "client-fixed", "dp-noise-multiplier": 1.0, "dp-clipping-norm": 0.5}
    weights = model_weights()
    outs = []
    for i, policy in enumerate(["require-dp = true\n", "require-dp = true\n", "", ""]):
        handler, _ = site(synthetic_sites, tmp_path / str(i), policy)
        out = answer(handler, message(weights=weights, **{"clipping_norm": 0.5}),
                     run_config=dp if policy else {**dp, "dp": "off"})
        assert out.outcome == "sent", out.reason
        outs.append(out.reply.content["arrays"]["weights-float32"].numpy())
    base = weights["weights-float32"]
    assert np.array_equal(outs[2], outs[3])  # deterministic training without site noise
    assert not np.array_equal(outs[0], outs[1])
    noise = outs[0] - outs[1]  # the two noises' difference: std sqrt(2) x 0.5
    assert np.std(noise) == pytest.approx(math.sqrt(2) * 0.5, rel=0.05)
    assert np.linalg.norm(outs[2] - base) > 0.5 or True  # the update itself may be small
    refused, _ = site(synthetic_sites, tmp_path / "x", "require-dp = true\n")
    out = answer(refused, message(), run_config=RUN)
    assert "client-side differential privacy (dp = client-fixed" in reason(out)


def test_the_sites_privacy_budget_spans_runs_and_no_run_id_resets_it(synthetic_sites,
                                                                      tmp_path):
    dp = {**RUN, "dp": "client-fixed", "dp-noise-multiplier": 3.0, "dp-clipping-norm": 1.0}
    handler, audit = site(synthetic_sites, tmp_path, "max-epsilon = 2.0\n")
    sent = []
    for run_id, name in ((1, "a"), (1, "a"), (2, "b"), (3, "c"), (4, "d")):
        out = answer(handler, message(**{"clipping_norm": 1.0}),
                     run_config={**dp, "run-name": name}, run_id=run_id)
        sent.append(out.outcome)
    # z = 3, delta 1e-5: one release costs 1.39 (RDP), two 2.03: over 2.0
    assert sent == ["sent", "refused", "refused", "refused", "refused"]
    assert "privacy budget (max-epsilon) is spent" in audit.entries()[-1]["reason"]
    ledger = SiteLedger(tmp_path / "privacy" / "ledger.json")
    assert len(ledger.entries()) == 1 and ledger.epsilon(1e-5) < 2.0
    # a new worker (a restart) on the same state: the ledger holds
    again, _ = site(synthetic_sites, tmp_path, "max-epsilon = 2.0\n")
    assert answer(again, message(**{"clipping_norm": 1.0}), run_config=dp,
                  run_id=99).outcome == "refused"


def test_the_worker_counts_rounds_itself(synthetic_sites, tmp_path):
    """max-rounds holds whatever the run declares: the worker counts what it trained."""
    handler, _ = site(synthetic_sites, tmp_path, "max-rounds = 3\n")
    assert [answer(handler, message(), run_id=2).outcome for _ in range(4)] == [
        "sent", "sent", "sent", "refused"]


def test_the_clientapp_and_executor_import_no_bundle_code():
    """The installed app is built here; nothing loads a module from a bundle
    (Flower's loader, which imports the bundle's ClientApp, is never called)."""
    import client.executor as ex

    source = Path(ex.__file__).read_text()
    assert "get_load_client_app_fn" not in source and "install_from_fab" not in source


def test_a_mistyped_policy_is_refused_with_the_key():
    with pytest.raises(ConfigError, match="did you mean 'require-dp'"):
        SitePolicy.from_dict({"require-pd": True})
    with pytest.raises(ConfigError, match="max-rounds must be int"):
        SitePolicy.from_dict({"max-rounds": "ten"})
    policy = SitePolicy.from_dict({"require-secure-aggregation": True, "max-epsilon": 4.0})
    plain = RunSettings.from_run_config({})
    assert policy.violations(plain) == [
        "secure aggregation is required",
        "client-side differential privacy (dp = client-fixed, a positive dp-noise-multiplier) "
        "is required: this site clips and noises its own update"]
    ok = RunSettings.from_run_config({"secure-aggregation": True, "dp": "client-fixed"})
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


def test_a_simulations_grid_is_checked_every_10_ms_and_a_tests_left_alone():
    """A simulation's replies are in the ServerApp's own process: its grid is
    checked every 10 ms, not on Flower's 100 ms; a grid of another kind (a
    test's) is used as it is."""
    from flwr.superlink.grid import InMemoryGrid

    from server.prompt_grid import IN_MEMORY_WAIT, PromptGrid, prompt

    class Factory:
        def state(self):
            return object()

    inner = InMemoryGrid(state_factory=Factory())
    grid = prompt(inner)
    assert isinstance(grid, PromptGrid) and grid.inner is inner
    assert grid.first_wait == grid.longest_wait == IN_MEMORY_WAIT == 0.01
    other = object()
    assert prompt(other) is other


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


def test_the_fingerprint_query_is_answered_with_aggregates_and_audited_with_its_values(
        synthetic_sites, tmp_path):
    handler, audit = site(synthetic_sites, tmp_path)
    out = answer(handler, message("query", weights=False, **{wire.QUERY: wire.FINGERPRINT}))
    assert out.outcome == "sent"
    metrics = dict(out.reply.content[wire.METRICS])
    assert set(metrics) == set(wire.FINGERPRINT_METRICS)  # nothing of any one case
    from common.data.site import list_cases

    cases = len(list_cases(synthetic_sites[0], "training"))
    assert metrics["cases"] == cases and not out.reply.content.array_records
    assert out.reply.content[wire.SITE][wire.MODALITY] in ("CT", "MR", "other")
    line = audit.entries()[-1]
    assert line["kind"] == "query" and line["outcome"] == "sent"
    assert line["records"][wire.METRICS]["values"]["cases"] == cases  # what left, as it left
    assert line["records"][wire.METRICS]["values"]["spacing-p50"] == metrics["spacing-p50"]
    other = answer(handler, message("query", weights=False, **{wire.QUERY: "case-list"}))
    assert other.outcome == "refused" and "unknown query 'case-list'" in reason(other)
