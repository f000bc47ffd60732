from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp.strategy import FedAdam

from common.config import RunSettings
from common.training import learning_rate_at


class ScheduledFedAdam(FedAdam):
    """Flower's FedAdam whose server learning rate follows the sites' schedule
    (``lr-schedule``): Adam's normalised step would otherwise stay ``eta`` in
    size while the sites' updates shrink, and the model would never settle."""

    def __init__(self, settings: RunSettings, rounds_done: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.rounds_done = rounds_done

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        done = (self.rounds_done + server_round - 1) / self.settings.num_rounds
        self.eta = (self.settings.fedadam_eta * learning_rate_at(done, self.settings)
                    / self.settings.learning_rate)
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:  # Flower's Adam computes in float64: back to the model's type
            from flwr.app import Array, ArrayRecord

            dtypes = {k: a.numpy().dtype for m in replies if m.has_content()
                      for k, a in next(iter(m.content.array_records.values())).items()}
            arrays = ArrayRecord({k: Array(a.numpy().astype(dtypes.get(k, a.numpy().dtype),
                                                             copy=False))
                                  for k, a in arrays.items()})
        return arrays, metrics
