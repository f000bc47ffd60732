"""Hand-made replies for the strategy tests (real Flower Messages)."""

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from common import wire


def reply(value: float, cases: int, steps: int, src: int | None = None) -> Message:
    """A train reply from site-<cases>: weights all ``value``."""
    request = Message(content=RecordDict({}), dst_node_id=src or 1,
                      message_type=MessageType.TRAIN)
    content = RecordDict({
        wire.ARRAYS: ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))}),
        wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: cases, wire.TRAIN_STEPS: steps}),
        wire.SITE: ConfigRecord({wire.SITE_NAME: f"site-{cases}"})})
    return Message(content, reply_to=request)


def error_from(node: int, reason: str) -> Message:
    """An error reply whose source is ``node``."""
    request = Message(content=RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(Error(code=0, reason=reason), reply_to=request)


class NoGrid:
    def __init__(self, nodes: list[int] | None = None) -> None:
        self.nodes = nodes or [1, 2]

    def get_node_ids(self):
        return self.nodes
