"""What a reply may bring into the run: the run's declared keys, each of its
kind; the rest dropped, named in the list of what was dropped."""

import math

import pytest
from flwr.app import ConfigRecord, MetricRecord

from common import wire
from server.strategies.declared import NAME_LIMIT, TEXT_LIMIT, Declared, bounded
from tests.unit.strategies.messages import reply

pytestmark = pytest.mark.usefixtures("task_identity")


def test_a_train_reply_is_cut_in_place_to_the_declared_records_keys_and_kinds():
    msg = reply(1.0, 2, 3)
    metrics = msg.content[wire.METRICS]
    metrics.update({wire.TRAIN_LOSS: 0.5, wire.TRAIN_SECONDS: math.inf, "global-dice": math.nan,
                    "global-dice/liver": 0.5, "zz-loot": 1.0, "dp-unit-weight": 9})
    msg.content[wire.SITE].update({wire.SITE_NAME: "x" * 500, wire.LEFT_OUT: "y" * 5000,
                                   "zz-note": "secret", wire.EVALUATE_ERROR: 3})
    msg.content["zz-record"] = MetricRecord({"a": 1.0})
    msg.content[wire.CONFIG] = ConfigRecord({"b": "c"})  # a declared name, not in a reply

    kept, notes, dropped = Declared().reply(msg, "train")

    assert set(msg.content.keys()) == {wire.ARRAYS, wire.METRICS, wire.SITE}
    assert dict(msg.content[wire.METRICS]) == kept
    assert set(kept) == {wire.NUM_EXAMPLES, wire.TRAIN_STEPS, wire.TRAIN_LOSS, "global-dice"}
    assert isinstance(kept[wire.NUM_EXAMPLES], int) and math.isnan(kept["global-dice"])
    assert notes == {wire.LEFT_OUT: "y" * (TEXT_LIMIT - 1) + "…"}
    assert len(msg.content[wire.SITE][wire.SITE_NAME]) == NAME_LIMIT
    assert sorted(dropped) == sorted([
        "record zz-record", "record config", "metric zz-loot", "metric dp-unit-weight",
        "metric global-dice/liver", f"metric {wire.TRAIN_SECONDS} (not a finite number)",
        "site note zz-note", f"site note {wire.EVALUATE_ERROR} (not text)",
        f"site note {wire.LEFT_OUT} (cut to {TEXT_LIMIT} characters)"])


def test_the_runs_structures_and_dp_mode_decide_the_keys():
    several = Declared(("liver", "lesion"))
    assert "dice/liver" in several.metric_keys("evaluate")
    assert "global-dice/lesion" in several.metric_keys("train")
    assert "dice/liver" not in Declared().metric_keys("evaluate")
    assert "norm_bit" in Declared(flower_keys=("norm_bit",)).metric_keys("train")
    assert "norm_bit" not in Declared().metric_keys("train")
    counts, dropped = Declared().metrics("evaluate", {wire.NUM_EXAMPLES: -1, "dice": True})
    assert counts == {} and dropped == [f"metric {wire.NUM_EXAMPLES} (not a count)",
                                        "metric dice (not a finite number)"]


def test_bounded_text_is_one_printable_line():
    assert bounded("a\nb\x00\tc  d") == "a b c d"
    assert bounded("é" * 10, 4) == "ééé…"
