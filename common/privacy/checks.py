"""Checks on a client's update before it may enter the aggregate."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def update_problem(
    update: Mapping[str, np.ndarray], reference: Mapping[str, tuple[tuple[int, ...], str]]
) -> str | None:
    """Why an update must be left out, or None when it is fit to aggregate.

    ``reference`` maps each parameter name to its ``(shape, dtype)`` as it
    must arrive: the global model's shape, and the dtype its weights travel
    in (the run's ``transfer-precision``). The answer names parameters, never
    values.
    """
    missing = sorted(set(reference) - set(update))
    if missing:
        return f"missing {len(missing)} weight(s), e.g. {missing[0]!r}"
    extra = sorted(set(update) - set(reference))
    if extra:
        return f"{len(extra)} unexpected weight(s), e.g. {extra[0]!r}"
    for name, (shape, dtype) in reference.items():
        array = update[name]
        if tuple(array.shape) != tuple(shape):
            return f"weight {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)}"
        if not np.issubdtype(array.dtype, np.number):
            return f"weight {name!r} is not numeric"
        if array.dtype.name != dtype:
            return (f"weight {name!r} arrived as {array.dtype.name}; the run's weights "
                    f"travel as {dtype} (transfer-precision)")
        if not np.isfinite(array).all():
            return f"weight {name!r} holds NaN or infinite values"
    return None
