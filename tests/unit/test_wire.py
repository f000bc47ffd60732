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
                 and k not in ("DOWN", "UP", "GLOBAL_PREFIX")} | set(wire.SCORES)
    constants |= {wire.GLOBAL_PREFIX + k for k in wire.EVAL_METRICS}  # scores in train
    keys = {e.key for e in wire.TABLE}
    records = {e.record.strip("`") for e in wire.TABLE}
    assert keys <= constants, "a documented key without a constant"
    assert constants <= keys | records, "a constant missing from the table"
