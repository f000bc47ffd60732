"""What crosses the wire is named in one module, and the docs show exactly that."""

from pathlib import Path

from common import wire

ROOT = Path(__file__).resolve().parents[2]


def test_architecture_docs_show_the_wire_table():
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert wire.table_markdown() in text, (
        "docs/architecture.md's wire table differs from common/wire.py's table_markdown()")


def test_every_named_key_is_in_the_table_and_nothing_else():
    constants = {v for k, v in vars(wire).items() if k.isupper() and isinstance(v, str)
                 and k not in ("DOWN", "UP", "GLOBAL_PREFIX", "STRUCTURE_SEP")} | set(wire.SCORES)
    constants |= {wire.GLOBAL_PREFIX + k for k in wire.EVAL_METRICS}  # scores in train
    constants |= set(wire.FINGERPRINT_METRICS)  # a query's reply
    constants.add(wire.structure_key("<score>", "<structure>"))  # one row for them all
    keys = {e.key for e in wire.TABLE}
    records = {e.record.strip("`") for e in wire.TABLE}
    assert keys <= constants, "a documented key without a constant"
    assert constants <= keys | records, "a constant missing from the table"


def test_a_run_with_several_structures_adds_each_score_per_structure():
    assert wire.eval_metrics(("foreground",)) == wire.EVAL_METRICS  # binary runs as before
    assert wire.score_keys(("liver",)) == wire.SCORES
    keys = wire.score_keys(("liver", "lesion"))
    assert keys[:5] == wire.SCORES
    assert keys[5:7] == ("dice/liver", "iou/liver") and keys[-1] == "specificity/lesion"
    assert len(keys) == 15 and all(wire.is_score(k) for k in keys)
    assert not any(wire.is_score(k) for k in (wire.NUM_EXAMPLES, "global-dice", "dices"))


def test_flower_carries_per_structure_keys():
    """Structure names hold letters, digits, spaces and . ( ) + - _: a
    MetricRecord keeps such keys through Flower's serialisation."""
    from flwr.app import MetricRecord, RecordDict
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    metrics = {wire.structure_key("dice", "Lung L (upper)"): 0.5,
               wire.GLOBAL_PREFIX + wire.structure_key("hd95", "a+b_c-1.2"): float("nan")}
    back = recorddict_from_proto(recorddict_to_proto(
        RecordDict({wire.METRICS: MetricRecord(metrics)})))[wire.METRICS]
    assert set(back) == set(metrics)
