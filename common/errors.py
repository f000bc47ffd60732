"""One exception hierarchy for fedseg.

Every error raised at a site has two faces:

* ``str(err)``: the full message for the site's own log. It may name the case
  folder, the file and what the library said, because it stays in the hospital.
* ``err.scrubbed()``: what may leave the site (Flower forwards a client's
  exception text to the server). It says what kind of failure happened and, for
  data errors, which case by its position in the site's list, never a path, a
  file name or a value read from the data.
"""

from __future__ import annotations

from common.wire import ERROR_SITE, ERROR_TEXT


class FedsegError(Exception):
    """Base class of every error fedseg raises on purpose."""

    kind = "error"

    def scrubbed(self) -> str:
        """Text that may cross the network: the kind of failure, nothing else."""
        return f"fedseg {self.kind}"


class ConfigError(FedsegError, ValueError):
    """A setting is missing or out of range. Settings are not patient data."""

    kind = "configuration error"

    def scrubbed(self) -> str:
        return f"fedseg {self.kind}: {self}"


class DataError(FedsegError):
    """A site's data cannot be used.

    Parameters
    ----------
    problem:
        What is wrong, in words a hospital engineer can act on.
    case:
        The case's identifier (its file or folder name), for the local log only.
    case_index:
        The case's position in the site's list; the only locator that may leave
        the site.
    """

    kind = "data error"

    def __init__(self, problem: str, *, case: str | None = None, case_index: int | None = None):
        self.problem = problem
        self.case = case
        self.case_index = case_index
        where = f"case {case!r}: " if case is not None else ""
        super().__init__(f"{where}{problem}")

    def scrubbed(self) -> str:
        where = f" in case #{self.case_index}" if self.case_index is not None else ""
        return f"fedseg {self.kind}{where} ({self.category})"

    @property
    def category(self) -> str:
        return "invalid data"


class UnreadableFileError(DataError):
    """A file exists but no reader can decode it."""

    @property
    def category(self) -> str:
        return "unreadable file"


class ShapeMismatchError(DataError):
    """An image and its label do not cover the same grid."""

    @property
    def category(self) -> str:
        return "image and label shapes differ"


class MissingLabelError(DataError):
    """An image has no label file."""

    @property
    def category(self) -> str:
        return "missing label"


class EmptyDatasetError(DataError):
    """A site folder holds no usable case for the requested split."""

    @property
    def category(self) -> str:
        return "empty dataset"


class UnsupportedFormatError(DataError):
    """A file's format is not one fedseg reads."""

    @property
    def category(self) -> str:
        return "unsupported format"


def scrub(exc: BaseException) -> str:
    """What may leave a site for any exception: fedseg's own scrubbed text, or
    only the exception's type for anything else (its text may hold a path)."""
    if isinstance(exc, FedsegError):
        return exc.scrubbed()
    return f"internal error ({type(exc).__name__})"


LOCAL_LOG_ENV = "FEDSEG_LOCAL_LOG"


def error_reason(site: str | None, text: str) -> str:
    """A failed site's error as it crosses the wire: its public name and the
    scrubbed text, as JSON (see :func:`parse_error_reason`)."""
    import json

    return json.dumps({ERROR_SITE: site, ERROR_TEXT: text}) if site else text


def parse_error_reason(reason: str) -> tuple[str | None, str]:
    """(site name or None, text) from an error reason written by
    :func:`error_reason`, or (None, reason) for any other text (Flower's own)."""
    import json

    try:
        value = json.loads(reason)
    except ValueError:
        return None, reason
    if isinstance(value, dict) and isinstance(value.get(ERROR_TEXT), str):
        site = value.get(ERROR_SITE)
        return (str(site) if site else None), value[ERROR_TEXT]
    return None, reason


def write_local_log(site: str | None, what: str, exc: BaseException) -> None:
    """In a simulation, append a site's full error (case name and cause, as its
    own log has it) to ``$FEDSEG_LOCAL_LOG``: every party runs on the user's
    machine, so the user sees why a site failed. Unset in a deployment, where
    the hospital's own node log holds it."""
    import os

    path = os.environ.get(LOCAL_LOG_ENV)
    if not path:
        return
    text = " ".join(str(exc).split()) or type(exc).__name__
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{site or 'a site'}: {what} failed: {type(exc).__name__}: {text}\n")
    except OSError:
        pass  # the local log is a convenience; the site's own log has the error
