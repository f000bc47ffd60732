"""Transfer precision (``transfer-precision``): the weights cast for the wire
and back, an overflow refused at the sender, the dtype held at both ends, and
a clipped update still within its norm as sent."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.app import make_app
from common import wire
from common.config import RunSettings
from common.errors import ConfigError, parse_error_reason
from common.model import build_model
from common.packing import (
    HALF_MAX,
    PrecisionOverflow,
    WrongPrecision,
    from_wire,
    pack,
    template_of,
    to_wire,
    unpack,
)
from server.strategies.checks import UpdateChecks
from server.strategies.transfer import TransferPrecision
from server.wire import content_bytes
from tests.unit.strategies.messages import NoGrid

pytestmark = pytest.mark.usefixtures("task_identity")

SMALL = {"model-channels": "8,16", "transfer-precision": "float16"}


@pytest.fixture(scope="module")
def model_state() -> dict[str, np.ndarray]:
    model = build_model(RunSettings.from_run_config(SMALL).model)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


# -- the cast ---------------------------------------------------------------------------

def test_float16_halves_the_bytes_and_comes_back_as_the_models_float32(model_state):
    packed = pack(model_state)
    sent = to_wire(packed, "float16")
    assert {k: a.dtype.name for k, a in sent.items()} == {"weights-float32": "float16"}
    assert sent["weights-float32"].nbytes * 2 == packed["weights-float32"].nbytes
    back = from_wire(sent, "float16")
    assert back["weights-float32"].dtype == np.float32
    # float16 rounds to 11 significant bits: half a unit in the last place
    error = np.abs(back["weights-float32"] - packed["weights-float32"])
    assert np.all(error <= np.abs(packed["weights-float32"]) * 2**-11 + 2**-25)
    state = unpack(back, template_of(model_state))  # what a site trains from
    assert all(state[k].dtype == np.float32 and state[k].shape == v.shape
               for k, v in model_state.items())
    record = RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in sent.items()})})
    full = RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in packed.items()})})
    assert content_bytes(record) / content_bytes(full) == pytest.approx(0.5, abs=0.01)


def test_float32_is_sent_as_it_is(model_state):
    packed = pack(model_state)
    sent = to_wire(packed, "float32")
    assert sent["weights-float32"] is packed["weights-float32"]
    assert from_wire(sent, "float32")["weights-float32"] is packed["weights-float32"]


def test_a_value_beyond_float16s_range_is_refused_at_the_sender_naming_the_weight(
        model_state):
    state = {k: v.copy() for k, v in model_state.items()}
    name = list(state)[3]
    state[name].flat[1] = 70_000.0  # float16 would carry it as infinity
    state[name].flat[2] = -1e9
    with pytest.raises(PrecisionOverflow) as caught:
        to_wire(pack(state), "float16")
    named = caught.value.named(template_of(state))
    assert f"weight {name!r}" in str(named) and "2 value(s) beyond float16's range" in str(named)
    assert "1e+09" in str(named)  # the site's own log has the value...
    assert "1e+09" not in named.scrubbed() and name in named.scrubbed()  # ...the wire not
    assert "transfer-precision float32" in named.scrubbed()
    # float16's largest value itself, NaN and infinity are no overflow of the cast
    # (the server's update checks refuse non-finite weights, in either precision)
    state[name].flat[1:3] = [HALF_MAX, -HALF_MAX]
    state[name].flat[4:6] = [np.nan, np.inf]
    sent = to_wire(pack(state), "float16")["weights-float32"]
    offset = sum(v.size for k, v in state.items() if list(state).index(k) < 3)
    assert list(sent[offset + 1: offset + 3]) == [HALF_MAX, -HALF_MAX]


def test_weights_not_in_the_agreed_precision_are_refused_by_the_receiver(model_state):
    packed = pack(model_state)
    with pytest.raises(WrongPrecision, match="weights-float32 arrived as float32; at "
                                             "transfer-precision float16 it travels as float16"):
        from_wire(packed, "float16")
    with pytest.raises(WrongPrecision, match="arrived as float16; at transfer-precision "
                                             "float32 it travels as float32"):
        from_wire(to_wire(packed, "float16"), "float32")


def test_the_setting_takes_float32_or_float16_only():
    assert RunSettings().transfer_precision == "float32"
    assert RunSettings.from_run_config({"transfer-precision": "float16"}).transfer_precision \
        == "float16"
    with pytest.raises(ConfigError, match="setting 'transfer-precision' must be one of "
                                          "float32, float16, got 'bfloat16'"):
        RunSettings.from_run_config({"transfer-precision": "bfloat16"})


def test_the_cast_never_lengthens_a_clipped_update():
    """Rounding to float16 can lengthen an update (here every value rounds
    away from the model it started from): with the reference given, the update
    as sent is never longer than the float32 one, so a DP-clipped update stays
    within its clipping norm."""
    reference = np.ones(10_000, np.float32)  # float16's step at 1.0 is 2^-10
    update = np.full(10_000, 0.6 * 2**-10, np.float32)
    new = reference + update
    bound = np.linalg.norm(update.astype(np.float64))
    plain = to_wire({"weights-float32": new}, "float16")["weights-float32"]
    assert np.linalg.norm(plain.astype(np.float64) - reference) > 1.5 * bound
    kept = to_wire({"weights-float32": new}, "float16",
                   reference={"weights-float32": reference})["weights-float32"]
    assert kept.dtype == np.float16
    assert np.linalg.norm(kept.astype(np.float64) - reference) <= bound
    # an ordinary update keeps nearly all of its length
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 0.1, 100_000).astype(np.float16).astype(np.float32)
    update = rng.normal(0, 1e-3, 100_000).astype(np.float32)
    bound = np.linalg.norm(update.astype(np.float64))
    kept = to_wire({"weights-float32": reference + update}, "float16",
                   reference={"weights-float32": reference})["weights-float32"]
    length = np.linalg.norm(kept.astype(np.float64) - reference)
    assert 0.98 * bound <= length <= bound


# -- a site: the ClientApp's mods, over a site that answers what the test says ----------

class Answers:
    """A site (``client.app.SiteAnswers``) whose train reply is ``reply(weights)``."""

    name = "hospital-x"

    def __init__(self, reply) -> None:
        self.reply = reply
        self.received: dict[str, np.ndarray] | None = None

    def request(self, kind: str, run_id: int, run_config: Mapping[str, Any],
                round_config: Mapping[str, Any], weights: Mapping[str, np.ndarray] | None):
        self.received = dict(weights or {})
        metrics = {wire.NUM_EXAMPLES: 4, wire.TRAIN_LOSS: 0.5, wire.TRAIN_SECONDS: 1.0,
                   wire.TRAIN_STEPS: 2}
        return self.reply(self.received), metrics, {}


def train(site: Answers, weights: Mapping[str, np.ndarray], run_config: dict[str, Any],
          config: dict[str, Any] | None = None) -> Message:
    app = make_app(lambda _context: site)
    msg = Message(RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in
                                                        weights.items()}),
                              wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1,
                                                         **(config or {})})}),
                  dst_node_id=7, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(),
                      run_config=run_config)
    return app(msg, context)  # the handler with its mods, as Flower calls it


def test_a_site_trains_in_float32_and_replies_in_float16(model_state):
    packed = pack(model_state)
    site = Answers(lambda w: {k: v + np.float32(0.01) for k, v in w.items()})
    reply = train(site, to_wire(packed, "float16"), SMALL)
    assert not reply.has_error()
    assert site.received["weights-float32"].dtype == np.float32  # upcast before training
    sent = reply.content[wire.ARRAYS]["weights-float32"].numpy()
    assert sent.dtype == np.float16
    np.testing.assert_allclose(sent.astype(np.float32), packed["weights-float32"] + 0.01,
                               atol=2e-3, rtol=2**-10)


def test_a_site_refuses_the_model_in_another_precision(model_state):
    site = Answers(lambda w: w)
    reply = train(site, pack(model_state), SMALL)  # float32 in a float16 run
    assert reply.has_error() and site.received is None  # refused before the site saw it
    name, text = parse_error_reason(reply.error.reason)
    assert name == "hospital-x"
    assert text == ("request refused by the site: weights-float32 arrived as float32; at "
                    "transfer-precision float16 it travels as float16")


def test_a_site_whose_weights_overflow_float16_fails_naming_the_weight(model_state):
    def diverged(weights):
        out = {k: v.copy() for k, v in weights.items()}
        out["weights-float32"][5] = 1e6
        return out

    first = list(model_state)[0]  # position 5 lies in the first weight
    reply = train(Answers(diverged), to_wire(pack(model_state), "float16"), SMALL)
    assert reply.has_error()
    name, text = parse_error_reason(reply.error.reason)
    assert name == "hospital-x"
    assert text == (f"fedseg transfer precision overflow: 1 value(s) beyond float16's range "
                    f"(+-65504), the first in weight {first!r}: float16 cannot carry it (use "
                    f"transfer-precision float32)")
    assert "1e+06" not in reply.error.reason


def test_under_client_side_dp_the_update_sent_is_within_the_clipping_norm():
    """Flower's clipping mod clips in float32 against the model received; the
    float16 cast after it keeps the update within the norm."""
    rng = np.random.default_rng(1)
    received = rng.normal(0, 0.05, 200_000).astype(np.float16)
    norm = 0.05
    site = Answers(lambda w: {k: v + rng.normal(0, 1e-3, v.shape).astype(np.float32)
                              for k, v in w.items()})
    reply = train(site, {"weights-float32": received},
                  {**SMALL, "dp": "client-fixed", "dp-clipping-norm": norm},
                  {KEY_CLIPPING_NORM: norm})
    assert not reply.has_error()
    sent = reply.content[wire.ARRAYS]["weights-float32"].numpy()
    assert sent.dtype == np.float16
    length = np.linalg.norm(sent.astype(np.float64) - received.astype(np.float64))
    assert 0.95 * norm <= length <= norm  # clipped (it was ~0.45), and still within


# -- the server: update checks and the cast back --------------------------------------

def reply_of(site: str, value: float, dtype) -> Message:
    request = Message(RecordDict({}), dst_node_id=1, message_type=MessageType.TRAIN)
    return Message(RecordDict({
        wire.ARRAYS: ArrayRecord({"weights-float32": Array(np.full(4, value, dtype))}),
        wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 2, wire.TRAIN_LOSS: 0.5,
                                    wire.TRAIN_SECONDS: 1.0, wire.TRAIN_STEPS: 2}),
        wire.SITE: ConfigRecord({wire.SITE_NAME: site})}), reply_to=request)


def test_the_server_sends_float16_takes_float16_only_and_aggregates_float32():
    rejected = []
    checks = UpdateChecks(TransferPrecision(FedAvg(min_available_nodes=2, min_train_nodes=2),
                                            "float16"),
                          on_reject=lambda r, text, site: rejected.append(text),
                          precision="float16")
    arrays = ArrayRecord({"weights-float32": Array(np.full(4, 0.1, np.float32))})

    class Grid(NoGrid):
        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content, dst_node_id, message_type, group_id=group_id)

    out = list(checks.configure_train(1, arrays, ConfigRecord({}), Grid()))
    assert len(out) == 2
    assert {m.content[wire.ARRAYS]["weights-float32"].numpy().dtype for m in out} == \
        {np.dtype(np.float16)}
    assert arrays["weights-float32"].numpy().dtype == np.float32  # the server's stays float32
    replies = [reply_of("a", 1.0, np.float16), reply_of("b", 3.0, np.float16),
               reply_of("old-site", 9.0, np.float32)]
    aggregate, _ = checks.aggregate_train(1, replies)
    assert aggregate["weights-float32"].numpy().dtype == np.float32
    np.testing.assert_allclose(aggregate["weights-float32"].numpy(), 2.0)  # a and b only
    assert rejected == ["update from old-site left out: weight 'weights-float32' arrived as "
                        "float32; the run's weights travel as float16 (transfer-precision)"]
