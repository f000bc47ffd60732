"""The model's weights as they travel: one flat vector per dtype.

Flower 1.42 moves every array of a message as its own objects (an ``Array``
and its chunks), and a deployment's SuperLink keeps each object in its SQL
state: about 60 ms of SuperLink work per object on a 2-core machine. The
U-Net's state dict has 63 arrays, so a model crossing the wire was ~130
objects each way per site per round. Packed, it is one array (two chunks of
Flower's 5 MB): the same numbers, the same bytes, 20 times fewer objects.

Both ends build the run's model from the run's settings, so the names and
shapes (the template) never travel. FedAvg, FedProx, FedNova, FedAdam, DP
clipping (the norm of the flat vector is the norm over all arrays) and
SecAgg+ act on the flat vectors exactly as on the arrays.

numpy only: the ClientApp side never needs torch for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from common.errors import ConfigError, FedsegError

PREFIX = "weights-"  # a packed key: PREFIX + dtype name

Template = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype name)


def template_of(state: Mapping[str, Any]) -> Template:
    """Names, shapes and dtypes of a state dict (torch tensors or arrays)."""
    out = {}
    for name, value in state.items():
        a = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        out[name] = (tuple(a.shape), a.dtype.name)
    return out


def packed_template(template: Template) -> Template:
    """The packed arrays' names and shapes for ``template``."""
    sizes: dict[str, int] = {}
    for shape, dtype in template.values():
        sizes[dtype] = sizes.get(dtype, 0) + int(np.prod(shape, dtype=np.int64))
    return {PREFIX + dtype: ((n,), dtype) for dtype, n in sizes.items()}


def pack(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state dict as one flat vector per dtype, in the state's order."""
    parts: dict[str, list[np.ndarray]] = {}
    for value in state.values():
        a = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        parts.setdefault(a.dtype.name, []).append(a.reshape(-1))
    return {PREFIX + dtype: np.concatenate(p) for dtype, p in parts.items()}


def unpack(packed: Mapping[str, np.ndarray], template: Template) -> dict[str, np.ndarray]:
    """The state dict back from :func:`pack`'s vectors (views, no copy).
    Raises ``ValueError`` naming what does not fit ``template``."""
    expected = packed_template(template)
    if set(packed) != set(expected):
        raise ValueError(f"packed weights hold {sorted(packed)}, the model needs "
                         f"{sorted(expected)}")
    for key, (shape, dtype) in expected.items():
        got = np.asarray(packed[key])
        if got.shape != shape or got.dtype.name != dtype:
            raise ValueError(f"{key}: {got.dtype.name} {got.shape}, the model needs "
                             f"{dtype} {shape}")
    offsets = dict.fromkeys(expected, 0)
    out = {}
    for name, (shape, dtype) in template.items():
        n = int(np.prod(shape, dtype=np.int64))
        key = PREFIX + dtype
        out[name] = np.asarray(packed[key])[offsets[key]:offsets[key] + n].reshape(shape)
        offsets[key] += n
    return out


# --- Transfer precision: the dtype the packed vectors travel in -------------------------
#
# The run setting ``transfer-precision`` says how the weights cross the wire.
# ``float32``: as the model holds them. ``float16``: every float32 vector
# travels as float16 (half the bytes), both ways; each end casts back to the
# model's dtype (the key still names it: ``weights-float32``) before anything
# else reads it, so training, clipping, aggregation and the saved models stay
# float32. float16, not bfloat16: numpy (Flower's arrays) has no bfloat16, and
# weights need float16's 11-bit precision more than bfloat16's range (a U-Net's
# weights lie far inside float16's +-65504; a value beyond it is refused at the
# sender, :class:`PrecisionOverflow`, never sent as infinity).

PRECISIONS = ("float32", "float16")
HALF_MAX = float(np.finfo(np.float16).max)  # 65504


class PrecisionOverflow(FedsegError, ValueError):
    """Weights with values beyond float16's range, to be sent at transfer
    precision float16: refused at the sender instead of sent as infinity."""

    kind = "transfer precision overflow"
    ADVICE = "float16 cannot carry it (use transfer-precision float32)"

    def __init__(self, key: str, position: int, count: int, largest: float,
                 name: str | None = None) -> None:
        self.key, self.position, self.count, self.largest = key, position, count, largest
        self.name = name
        super().__init__(f"{self._what()} (largest |value| {largest:.6g}): {self.ADVICE}")

    def _what(self) -> str:
        where = (f"weight {self.name!r}" if self.name else
                 f"{self.key} at position {self.position}")
        return (f"{self.count} value(s) beyond float16's range (+-{HALF_MAX:.0f}), the first "
                f"in {where}")

    def named(self, template: Template) -> PrecisionOverflow:
        """The same overflow, naming the model's weight that holds it."""
        return PrecisionOverflow(self.key, self.position, self.count, self.largest,
                                 weight_at(template, self.key, self.position))

    def scrubbed(self) -> str:  # names a weight, never a value
        return f"fedseg {self.kind}: {self._what()}: {self.ADVICE}"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"transfer-precision must be one of {', '.join(PRECISIONS)}, "
                          f"got {precision!r}")
    return precision


def wire_dtype(dtype: str, precision: str) -> str:
    """The dtype in which an array the model holds as ``dtype`` travels."""
    return "float16" if check_precision(precision) == "float16" and dtype == "float32" \
        else dtype


def model_dtype(key: str) -> str | None:
    """The model's dtype of a packed vector, from its key (None: not a packed key)."""
    return key[len(PREFIX):] if key.startswith(PREFIX) else None


def wire_template(packed: Template, precision: str) -> Template:
    """``packed_template(...)`` as it travels at ``precision``."""
    return {k: (shape, wire_dtype(dtype, precision)) for k, (shape, dtype) in packed.items()}


def weight_at(template: Template, key: str, position: int) -> str | None:
    """The name of the weight at ``position`` of packed vector ``key``."""
    offset = 0
    for name, (shape, dtype) in template.items():
        if PREFIX + dtype != key:
            continue
        offset += int(np.prod(shape, dtype=np.int64))
        if position < offset:
            return name
    return None


def _overflow(key: str, a: np.ndarray) -> PrecisionOverflow | None:
    over = np.abs(a) > HALF_MAX  # NaN compares False; infinity is no overflow of the cast
    over &= np.isfinite(a)
    if not over.any():
        return None
    where = np.flatnonzero(over)
    return PrecisionOverflow(key, int(where[0]), int(where.size),
                             float(np.abs(a[where]).max()))


def to_wire(packed: Mapping[str, np.ndarray], precision: str,
            reference: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """:func:`pack`'s vectors as they travel at ``precision`` (a float32 vector
    as float16 for ``float16``; anything else as it is).

    ``reference``: the vectors the sender started from (a site: the model it
    received). The cast then never lengthens the update ``vector - reference``
    (L2 over all vectors): where rounding to float16 would, the update is
    shortened until it does not, so an update clipped to a norm (DP) is still
    within it as sent. A finite value beyond float16's range raises
    :class:`PrecisionOverflow` (naming the vector and position) instead of
    travelling as infinity.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in packed.items():
        a = np.asarray(value)
        target = wire_dtype(a.dtype.name, precision)
        if target == a.dtype.name:
            out[key] = a
            continue
        problem = _overflow(key, a)
        if problem is not None:
            raise problem
        out[key] = a.astype(target)
    if reference is not None and any(out[k].dtype != np.asarray(packed[k]).dtype
                                     for k in out):
        out = _within_norm(packed, out, reference)
    return out


def _norm(parts: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.dot(p, p)) for p in parts)))


def _within_norm(packed: Mapping[str, np.ndarray], cast: dict[str, np.ndarray],
                 reference: Mapping[str, np.ndarray], tries: int = 40
                 ) -> dict[str, np.ndarray]:
    """``cast`` with the update shortened until, as cast, it is no longer
    than in ``packed`` (each round of shortening scales it by the ratio of the
    two lengths; after ``tries``, the reference itself: no update at all)."""
    keys = [k for k in cast if cast[k].dtype != np.asarray(packed[k]).dtype]
    ref = {k: np.asarray(reference[k], dtype=np.float64).ravel() for k in keys}
    update = {k: np.asarray(packed[k], dtype=np.float64).ravel() - ref[k] for k in keys}
    bound = _norm(list(update.values()))
    scale, out = 1.0, dict(cast)
    for _ in range(tries):
        sent = {k: out[k].astype(np.float64).ravel() - ref[k] for k in keys}
        length = _norm(list(sent.values()))
        if length <= bound:
            return out
        scale *= bound / length * (1 - 2**-12)
        for k in keys:
            out[k] = (ref[k] + scale * update[k]).astype(cast[k].dtype).reshape(cast[k].shape)
    for k in keys:  # no shorter cast found: send no update
        out[k] = np.asarray(reference[k]).astype(cast[k].dtype).reshape(cast[k].shape)
    return out


class WrongPrecision(ValueError):
    """A vector that did not arrive in the run's transfer precision."""


def from_wire(packed: Mapping[str, np.ndarray], precision: str) -> dict[str, np.ndarray]:
    """:func:`to_wire`'s vectors back in the model's dtypes (named by their
    keys). A packed vector not in the dtype ``precision`` sends it in raises
    :class:`WrongPrecision`, naming it; keys that are not packed weights pass
    unchanged (the receiver's own checks refuse them)."""
    out = {}
    for key, value in packed.items():
        a = np.asarray(value)
        dtype = model_dtype(key)
        if dtype is None:
            out[key] = a
            continue
        expected = wire_dtype(dtype, precision)
        if a.dtype.name != expected:
            raise WrongPrecision(f"{key} arrived as {a.dtype.name}; at transfer-precision "
                                 f"{precision} it travels as {expected}")
        out[key] = a.astype(dtype) if expected != dtype else a
    return out
