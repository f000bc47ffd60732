"""DICOM attribute values, read and checked: what the image and label readers
(:mod:`common.data.readers`) and the RTSTRUCT reader (:mod:`common.data.rtstruct`)
share. pydicom parses a value when it is first read, so a damaged value fails
here as a :class:`common.errors.UnreadableFileError` naming the attribute and
the file, never as a library's exception."""

from __future__ import annotations

import numpy as np

from common.errors import UnreadableFileError


def _show(value) -> str:
    text = repr(list(value) if isinstance(value, (list, tuple)) else value)
    return text if len(text) <= 80 else text[:77] + "..."



_MISSING = object()


def _attr(ds, keyword: str, name: str, default=None):
    """A DICOM attribute's value. pydicom parses a value when it is first read, so a
    damaged value fails here, with the attribute named."""
    try:
        return ds.get(keyword, default)
    except MemoryError:
        raise
    except Exception as exc:
        raise UnreadableFileError(
            f"DICOM file {name}: the value of {keyword} cannot be parsed ({exc})") from None


def _int_attr(ds, keyword: str, name: str, default=_MISSING, *, allowed=None, low: int = 1,
              high: int | None = None) -> int:
    """A whole-number DICOM attribute, checked against its allowed values."""
    value = _attr(ds, keyword, name, _MISSING)
    if value is _MISSING or value is None or (isinstance(value, str) and not value.strip()):
        if default is _MISSING:
            raise UnreadableFileError(f"DICOM file {name} has no {keyword}, which an image needs")
        return default
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = int(value)
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        number = int(value.strip())
    if (number is None or (allowed is not None and number not in allowed) or number < low
            or (high is not None and number > high)):
        expected = (f"one of {sorted(allowed)}" if allowed is not None else
                    f"a whole number from {low}" + (f" to {high}" if high is not None else ""))
        raise UnreadableFileError(
            f"DICOM file {name}: {keyword} is {_show(value)}, not {expected} (corrupt header?)")
    return number


def _floats(value, count: int, keyword: str, name: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        values = np.array([])
    if values.shape != (count,) or not np.isfinite(values).all():
        raise UnreadableFileError(
            f"DICOM file {name}: {keyword} is {_show(value)}, not {count} numbers "
            f"(corrupt header?)")
    return values
