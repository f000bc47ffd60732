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
