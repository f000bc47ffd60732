"""A node's prepared cases, kept between rounds while their files are unchanged.

A hospital's node trains and scores on the same files every round. Reading and
normalising them again each time cost 0.24 s of a 5.5 s retina round, and
grows with the site's data, not its training (docs/performance.md), so the
node keeps the prepared cases of the
last few ``(folder, split, preparation)`` it was asked for, in memory in
its own process. Any change to the folder's case list or to a file's size or
modification time reads the folder again.

With ``store`` (the site state's ``prepared/`` folder, as every node has:
``client/service.py``) the prepared cases live on disk instead
(``common.data.store``): what this process keeps is then a list of small
handles, each case's arrays memory-mapped only while training or scoring
reads them, so its memory does not grow with the site; a changed case is
prepared again alone, and a new process (a restarted node, the next run with
the same preparation) finds the cases already prepared.

A simulation's worker process serves many sites one after another; it holds
the cases of only the site it serves now (:func:`keep_only`, called by the
ClientApp), so its memory does not grow with the number of sites.
:func:`folders_held` and :func:`peak_folders` say how many sites' cases the
process holds, and held at most (its log line per message, ``client/app.py``).
Of the other sites it keeps only the handles of cases prepared on disk (a
case's name, spacing, shapes, the stored files' sizes and stamps: no array,
nothing mapped), at most ``MAX_PARKED`` lists and ``MAX_PARKED_FILES``
source files among them: a worker that serves a site again, as Flower's
simulation engine makes it do in most rounds, then checks that site's files
and its stored files (a stat each) and takes the handles, without reading a
case or opening a stored array (a switch took 0.044 s instead of 0.10,
docs/performance.md). :func:`folders_parked` names them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path

from common.data.labels import Classes
from common.data.site import Case, DataError, list_cases, load_case, read_site
from common.data.transforms import Preparation, prepared

log = logging.getLogger(__name__)

MAX_ENTRIES = 4  # training + test, for two input-channel settings or folders
# Of sites a simulation's worker does not serve now, lists of handles of cases
# on disk: at most this many, and their folders' files at most this many
# (about 0.7 kB a file, its line of the signature with its handle's share:
# at most about 35 MB of handles in all; docs/performance.md)
MAX_PARKED = 16
MAX_PARKED_FILES = 50_000

_Key = tuple[str, str, str, str, str | None, str]
_Signature = tuple[tuple[str, int, int], ...]
_cache: OrderedDict[_Key, tuple[_Signature, list[Case], list[DataError]]] = OrderedDict()
Progress = Callable[[int, int], None]  # (cases done, cases listed)
# The last read through a store: its folder, cases prepared then, cases reused
last_store_read: dict[str, str | int] = {}
_peak = 0  # the most site folders whose cases this process held at once
_serving: str | None = None  # the folder keep_only named last (a simulation's worker)


def _files(path: Path) -> list[Path]:
    if path.is_dir():  # a DICOM series folder
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def files_signature(site_dir: Path, split: str) -> _Signature:
    """Size and modification time of every file ``split`` reads: a case changed, added
    or removed changes it (the prepared-case cache and the fingerprint memo)."""
    refs = list_cases(site_dir, split)
    paths = [site_dir / "dataset.json"]
    paths += [p for ref in refs for p in (ref.image, ref.label) if p is not None]
    signature = []
    for path in paths:
        for f in _files(path):
            try:
                st = f.stat()
                signature.append((str(f), st.st_size, st.st_mtime_ns))
            except OSError:  # gone: load_site names the case
                signature.append((str(f), -1, -1))
    return tuple(signature)


def load_prepared(site_dir: Path, split: str, channels: Preparation | str,
                  classes: Classes | None = None, *, store: Path | None = None,
                  layout: str = "volume", progress: Progress | None = None
                  ) -> tuple[list[Case], list[DataError]]:
    """The usable cases of ``split``, prepared as ``channels`` says (input
    channels, or a whole ``Preparation``: channels, target spacing, intensity; see
    ``common.data.transforms.prepared``), and the errors of the cases left out
    (``common.data.site.read_site``); from memory when the files are the ones
    read last time. ``classes``: the run's classes at this site
    (``common.data.labels.site_classes``). The arrays are shared between calls: read them, do not
    write to them.

    ``store``: keep the prepared cases on disk there (``common.data.store``;
    ``layout`` ``slices`` for a 2D model on 3D cases) and return handles
    whose arrays are memory-mapped on access; None: in this process's memory.
    ``progress(done, listed)`` after each case read."""
    site_dir = Path(site_dir).resolve()
    key = (str(site_dir), split, repr(channels), repr(classes),
           None if store is None else str(Path(store).resolve()), layout)
    signature = files_signature(site_dir, split)
    hit = _cache.get(key)
    if hit is not None and hit[0] == signature and (store is None or _intact(hit[1])):
        _cache.move_to_end(key)
        _note_peak()
        return list(hit[1]), list(hit[2])
    _cache.pop(key, None)
    on_case = None
    if progress is not None:
        listed = len(list_cases(site_dir, split))

        def on_case(_ref, index: int, _result) -> None:
            progress(index + 1, listed)

    if store is None:
        read = read_site(site_dir, split, classes=classes, on_case=on_case,
                         load=partial(load_case, volumes=layout == "volume"))
        cases = prepared(read.cases, channels, keep_source=split == "test")
    else:
        from common.data.store import CaseStore

        prep = channels if isinstance(channels, Preparation) else Preparation(channels)
        stored = CaseStore(Path(store), site_dir, split, prep, classes, layout)
        read = read_site(site_dir, split, classes=classes, on_case=on_case, load=stored.load)
        stored.finish()
        cases = read.cases
        log.info("%s cases on disk in %s: %d prepared now, %d reused", split, stored.folder,
                 stored.written, stored.reused)
        last_store_read.update(folder=str(stored.folder), written=stored.written,
                               reused=stored.reused)
    _cache[key] = (signature, cases, read.left_out)
    _trim()
    _note_peak()
    log.info("prepared %d %s cases (kept for the next rounds)", len(cases), split)
    return list(cases), list(read.left_out)


def _held(key: _Key) -> bool:
    """Cases in this process's memory, or on disk for the folder it serves."""
    return key[4] is None or _serving in (None, key[0])


def _trim() -> None:
    """The oldest entries out: past ``MAX_ENTRIES`` held, past ``MAX_PARKED``
    parked or ``MAX_PARKED_FILES`` files in parked lists."""
    held = [k for k in _cache if _held(k)]  # oldest first
    for key in held[:max(0, len(held) - MAX_ENTRIES)]:
        del _cache[key]
    parked = [k for k in _cache if not _held(k)]
    files = sum(len(_cache[k][0]) for k in parked)
    while parked and (len(parked) > MAX_PARKED or files > MAX_PARKED_FILES):
        files -= len(_cache.pop(parked.pop(0))[0])


def _note_peak() -> None:
    global _peak
    _peak = max(_peak, len(folders_held()))


def _intact(cases: list[Case]) -> bool:
    """Whether every stored case's files are still the ones it was read from."""
    return all(case._store.intact(case) for case in cases if hasattr(case, "_store"))


def keep_only(site_dir: Path | None) -> None:
    """Serve ``site_dir`` from now on: forget the cases of every other folder
    held in memory, and park the handles of those on disk (None: forget every
    folder's, parked or not)."""
    global _serving
    if site_dir is None:
        _serving = None
        _cache.clear()
        return
    _serving = str(Path(site_dir).resolve())
    for key in [k for k in _cache if k[0] != _serving and k[4] is None]:
        del _cache[key]
    _trim()


def folders_held() -> list[str]:
    """The site folders whose prepared cases this process holds now: in
    memory, or on disk for the folder it serves (parked ones are not held)."""
    return sorted({key[0] for key in _cache if _held(key)})


def folders_parked() -> list[str]:
    """The other sites' folders whose handles of cases on disk are kept."""
    held = set(folders_held())
    return sorted({key[0] for key in _cache} - held)


def peak_folders() -> int:
    """The most site folders whose cases this process held at once."""
    return _peak


def clear() -> None:
    """Forget every kept case."""
    global _serving
    _serving = None
    _cache.clear()
