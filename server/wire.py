"""What crosses the wire, measured and (optionally) kept for audit."""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Message, RecordDict

AUDIT_DIR_ENV = "FEDSEG_AUDIT_DIR"


def content_bytes(content: RecordDict) -> int:
    """A message's payload as it is serialised for the wire (Flower's protobuf)."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).ByteSize()


def audit_dir() -> Path | None:
    """``$FEDSEG_AUDIT_DIR``: where the server keeps every reply it receives, as
    received, so a coordinator or a hospital's data-protection officer can
    check exactly what left the sites."""
    value = os.environ.get(AUDIT_DIR_ENV)
    return Path(value) if value else None


def audit(server_round: int, phase: str, msg: Message) -> None:
    """Keep ``msg`` (Flower's serialised message) in the audit folder, if one is set."""
    from flwr.common.serde import message_to_proto

    folder = audit_dir()
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    # the message id (the SHA-256 of its content) matches the hospital's audit line
    name = (f"round{server_round:04d}-{phase}-node{msg.metadata.src_node_id}-"
            f"{str(msg.metadata.message_id)[:16]}.bin")
    (folder / name).write_bytes(message_to_proto(msg).SerializeToString())
