"""The weights on the wire at the run's ``transfer-precision``.

Between the update checks (outside) and Flower's DP wrapper and FedAvg
(inside): every message going out carries the global model cast for the wire
(``common.packing.to_wire``: float16 for ``float16``), and every train reply,
whose dtype the update checks have already held to that precision, is cast
back to the model's float32 (``from_wire``) before anything inside reads it.
So DP clipping, the mean (or a robust rule, FedNova, FedAdam) and the model
the server keeps are float32; only the bytes on the wire change.

SecAgg+ rounds send their own messages from inside ``configure_train``:
``SecAggPlusFedAvg`` casts the model it sends with the same function
(``to_wire`` below), and its uploads are SecAgg+'s masked integers whatever
the precision.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, Message

from common import wire
from common.packing import PrecisionOverflow, Template, from_wire, to_wire
from server.strategies.base import StrategyWrapper


def wire_arrays(arrays: ArrayRecord, precision: str, template: Template | None = None
                ) -> ArrayRecord:
    """``arrays`` (the global model, packed) as they travel at ``precision``.
    A value beyond float16's range raises ``PrecisionOverflow`` naming the
    weight (``template``: the model's, for the name)."""
    if precision == "float32":
        return arrays
    try:
        cast = to_wire({k: a.numpy() for k, a in arrays.items()}, precision)
    except PrecisionOverflow as exc:
        raise (exc.named(template) if template else exc) from None
    return ArrayRecord({k: Array(v) for k, v in cast.items()})


class TransferPrecision(StrategyWrapper):
    """Casts the model going out to ``precision`` and train replies coming
    back to the model's dtypes. ``template``: the model's names and shapes,
    to name a weight that overflows."""

    def __init__(self, inner, precision: str, template: Template | None = None) -> None:
        super().__init__(inner)
        self.precision = precision
        self.template = template

    def _out(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        if self.precision == "float32":
            return messages
        # one cast per record (FedAvg's messages share one), the record kept
        # alive meanwhile so that its id is not another's
        cast: dict[int, tuple[ArrayRecord, ArrayRecord]] = {}
        for msg in messages:
            if wire.ARRAYS in msg.content.array_records:
                record = msg.content[wire.ARRAYS]
                if id(record) not in cast:
                    cast[id(record)] = (record, wire_arrays(record, self.precision,
                                                            self.template))
                msg.content[wire.ARRAYS] = cast[id(record)][1]
        return messages

    def configure_train(self, server_round, arrays, config, grid):
        return self._out(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self._out(super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        if self.precision != "float32":
            for msg in replies:
                if msg.has_error() or wire.ARRAYS not in msg.content.array_records:
                    continue
                arrays = from_wire({k: a.numpy() for k, a in msg.content[wire.ARRAYS].items()},
                                   self.precision)
                msg.content[wire.ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return super().aggregate_train(server_round, replies)
