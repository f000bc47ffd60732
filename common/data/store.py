"""Prepared cases on disk, in the site's state folder, read by memory mapping.

A hospital's site may hold more decoded volumes than its worker has memory
(one 512 x 512 x 300 CT is 300 MB as float32). Each case is prepared once
(``common.data.transforms.prepare_case``: channels, the run's spacing and
intensity scale) and written here as ``.npy`` files; training and scoring
open them with ``np.load(mmap_mode=...)`` for the moment they need them, so
the worker's resident memory holds the case in use, not the site.

Layout, under ``<site state>/prepared/``::

    <key>/                      one per (site folder, split, preparation, classes, layout)
        key.json                what the key stands for (stays at the site)
        index.json              the cases of the last complete read, with their signatures
        <case>.json             one case: its source files' signature, shapes, spacing,
                                the stored files' sizes; written last (the case's commit)
        <case>.image.npy        the prepared image (float32)
        <case>.label.npy        the prepared label (uint8)
        <case>.source.npy       a resampled test case's label as read (for scoring)

The ``KEEP_SETS`` sets read most recently are kept; older ones (another run's
spacing, structures or channels) are removed after a complete read.

``<case>`` is a hash of the case's image and label paths. A case is reused
while its image and label files keep their size and modification time; a
changed, added or removed case is prepared (or dropped) alone. Every file is
written to a temporary name and renamed into place, and a case's ``.json``
only after its arrays, so a preparation stopped at any moment (Ctrl-C, kill)
resumes with the cases not yet written. A stored file whose size, header,
shape or type is not the one its ``.json`` recorded (truncated, overwritten)
is never used: the case is prepared again.

``layout``: ``volume`` keeps arrays as ``prepare_case`` returns them (C x
spatial, C order: a 3D patch is read from the pages it covers and MONAI's
transforms take the mapped array without a copy); ``slices`` keeps a 3D case
slice by slice (Z x C x X x Y on disk) for a 2D model, which reads one
slice at a time: a slice of a C-order volume would touch every page of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.data.site import Case, CaseRef, load_case
from common.errors import DataError

log = logging.getLogger(__name__)

FORMAT = 1
LAYOUTS = ("volume", "slices")
MAP_MODE = "c"  # copy-on-write: the file is never written through a map; a stray
# in-place write by a transform costs a private page, not a crash or a changed file
KINDS = ("image", "label", "source")
KEEP_SETS = 4  # prepared sets a site state keeps: training and test of the last two settings


class DamagedStoreError(DataError):
    """A stored prepared case cannot be read back as it was written."""

    @property
    def category(self) -> str:
        return "damaged prepared copy"


def _files(path: Path) -> list[Path]:
    if path.is_dir():  # a DICOM series folder
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def source_signature(ref: CaseRef) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` of every file of a case's image and label."""
    signature: list[list[Any]] = []
    for path in (ref.image, ref.label):
        if path is None:
            continue
        for f in _files(Path(path)):
            try:
                st = f.stat()
                signature.append([str(f), st.st_size, st.st_mtime_ns])
            except OSError:
                signature.append([str(f), -1, -1])
    return signature


def _atomic_write(path: Path, write) -> int:
    """``write(file)`` to a temporary name beside ``path``, then renamed onto
    it; the size written. Nothing is left under either name on failure."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        size = tmp.stat().st_size
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class VoxelPicker:
    """The ``j``-th foreground (or background) voxel of a label, in the flat
    C order MONAI's ``map_binary_to_indices`` lists them, without the list:
    ``counts[i]`` is the number of foreground voxels before plane ``i`` of the
    first spatial axis, so one plane is read per pick. MONAI's
    ``RandCropByPosNegLabel`` takes it as its ``fg_indices`` / ``bg_indices``
    (it only asks ``len`` and ``[j]``) and draws the same centres as from
    the full index arrays, which for a large volume are 8 bytes a voxel."""

    def __init__(self, label: np.ndarray, counts: np.ndarray, foreground: bool) -> None:
        self.label, self.foreground = label, foreground
        spatial = label.shape[1:]
        self.plane = int(np.prod(spatial[1:], dtype=np.int64))
        # Background: MONAI 1.6 lists every voxel of a uint8 label tensor as
        # background (``torch.any`` keeps uint8 and ``~`` flips its bits), so
        # its negative patches are centred anywhere in the case; the same here,
        # so a case on disk trains exactly as in memory.
        self.cum = counts
        self.total = int(counts[-1]) if foreground else self.plane * (len(counts) - 1)

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, j) -> np.int64:
        j = int(j)
        if not 0 <= j < self.total:
            raise IndexError(j)
        if not self.foreground:
            return np.int64(j)
        i = int(np.searchsorted(self.cum, j, side="right")) - 1
        where = np.flatnonzero(np.asarray(self.label[:, i]).any(axis=0))
        return np.int64(i * self.plane + where[j - int(self.cum[i])])


def plane_counts(label: np.ndarray) -> np.ndarray:
    """Foreground voxels (any channel) before each plane of the first spatial
    axis: ``len = planes + 1``, int64."""
    per = np.count_nonzero(np.asarray(label).any(axis=0).reshape(label.shape[1], -1), axis=1)
    return np.concatenate([[0], np.cumsum(per, dtype=np.int64)])


class StoredCase(Case):
    """A prepared case whose arrays are on disk. ``image``, ``label`` and
    ``source`` open them (memory-mapped, copy-on-write) at each access: hold
    the array while you use it and let it go, and the pages it touched leave
    this process with it."""

    def __init__(self, store: CaseStore, key: str, meta: dict[str, Any], prepared) -> None:
        # Case's fields, but image/label/source are read on access
        self.case_id = meta["case_id"]
        self.spacing = tuple(float(v) for v in meta["spacing"])
        self.prepared = prepared
        meta = {k: v for k, v in meta.items() if k != "signature"}  # the store's, not the case's
        self._store, self._key, self._meta = store, key, meta
        self._counts = np.asarray(meta["plane_counts"], dtype=np.int64)
        self._stamp = store.stamp(key, meta)  # the stored files this handle reads

    def __repr__(self) -> str:
        return (f"StoredCase({self.case_id!r}, shape={tuple(self._meta['shape'])}, "
                f"layout={self._store.layout})")

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    @property
    def spatial_dims(self) -> int:
        return len(self._meta["shape"]) - 1

    @property
    def depth(self) -> int:
        """Slices of a 3D case (its last axis)."""
        return int(self._meta["shape"][-1])

    def _slices(self) -> bool:
        return self._store.layout == "slices" and self.spatial_dims == 3

    def _open(self, kind: str) -> np.ndarray:
        return self._store.open(self._key, self._meta, kind)

    @property
    def image(self) -> np.ndarray:
        a = self._open("image")
        return np.moveaxis(a, 0, -1) if self._slices() else a

    @property
    def label(self) -> np.ndarray:
        a = self._open("label")
        return np.moveaxis(a, 0, -1) if self._slices() else a

    @property
    def source(self) -> tuple[np.ndarray, tuple[float, ...]] | None:
        if "source" not in self._meta["shapes"]:
            return None
        return self._open("source"), tuple(float(v) for v in self._meta["source_spacing"])

    def training_item(self, index: int | None, patch: tuple[int, ...]) -> dict[str, Any]:
        """``{"image", "label"}`` of the whole case (``index`` None) or its
        ``index``-th slice, as views of the mapped files; a whole case at
        least ``patch`` along every axis also gets ``fg`` / ``bg`` pickers for
        ``RandCropByPosNegLabeld`` (a smaller one is padded first and MONAI
        lists its voxels itself, as it does in memory)."""
        if index is None:
            image, label = self.image, self.label
            item: dict[str, Any] = {"image": image, "label": label}
            if all(n >= p for n, p in zip(image.shape[1:], patch, strict=True)):
                item["fg"] = VoxelPicker(label, self._counts, True)
                item["bg"] = VoxelPicker(label, self._counts, False)
            return item
        if self._slices():
            return {"image": self._open("image")[index], "label": self._open("label")[index]}
        return {"image": self.image[..., index], "label": self.label[..., index]}


class CaseStore:
    """The prepared cases of one (site folder, split, preparation, classes,
    layout) in ``root`` (the site state's ``prepared/`` folder)."""

    def __init__(self, root: Path, site_dir: Path, split: str, prep, classes,
                 layout: str = "volume") -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.site_dir, self.split, self.prep, self.layout = site_dir, split, prep, layout
        what = {"format": FORMAT, "site": str(site_dir), "split": split,
                "preparation": repr(prep), "classes": repr(classes), "layout": layout}
        digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]
        self.folder = Path(root) / digest
        self.folder.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / "key.json"
        if not key_file.exists():
            _atomic_write(key_file, lambda fh: fh.write(json.dumps(what, indent=1).encode()))
        self._clean_temporary()
        self.reused = 0
        self.written = 0
        self.seen: list[tuple[str, str, list]] = []  # (key, case_id, signature) of this read

    def _clean_temporary(self) -> None:
        """Temporary files of a preparation that was killed (its process gone)."""
        for tmp in self.folder.glob("*.tmp-*"):
            pid = tmp.name.rsplit(".tmp-", 1)[1]
            if not pid.isdigit() or not _pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)

    @staticmethod
    def case_key(ref: CaseRef) -> str:
        text = json.dumps([str(ref.image), str(ref.label) if ref.label else None])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def path(self, key: str, kind: str) -> Path:
        return self.folder / f"{key}.{kind}.npy"

    # ----------------------------------------------------------- reading back

    def open(self, key: str, meta: dict[str, Any], kind: str) -> np.ndarray:
        """One stored array, memory-mapped; a DamagedStoreError naming the case
        (and the case forgotten, so the next read prepares it again) when it is
        not what was written."""
        path = self.path(key, kind)
        try:
            array = np.load(path, mmap_mode=MAP_MODE, allow_pickle=False)
            if list(array.shape) != list(meta["shapes"][kind]) or \
                    array.dtype.str != meta["dtypes"][kind]:
                raise ValueError(f"it holds {array.dtype} {array.shape}, not "
                                 f"{meta['dtypes'][kind]} {tuple(meta['shapes'][kind])}")
        except (OSError, ValueError, KeyError) as exc:
            self.forget(key)
            raise DamagedStoreError(
                f"its prepared copy {path.name} in {self.folder} cannot be read back "
                f"({type(exc).__name__}: {exc}); it is prepared again at the next read",
                case=meta.get("case_id")) from None
        return array

    def _meta(self, key: str) -> dict[str, Any] | None:
        try:
            meta = json.loads((self.folder / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None

    def _valid(self, key: str, meta: dict[str, Any]) -> bool:
        """Every stored file there, of the size recorded, with the header,
        shape and type recorded."""
        try:
            for kind, size in meta["sizes"].items():
                path = self.path(key, kind)
                if path.stat().st_size != size:
                    return False
                array = np.load(path, mmap_mode="r", allow_pickle=False)
                if list(array.shape) != list(meta["shapes"][kind]) or \
                        array.dtype.str != meta["dtypes"][kind]:
                    return False
                del array
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return True

    def stamp(self, key: str, meta: dict[str, Any]) -> tuple | None:
        """Inode, modification time and size of each of a case's stored files
        (None: one is missing). Every write replaces a file by renaming
        (``_atomic_write``), so a case prepared again, by this process or any
        other, has another stamp even where its sizes and times came back."""
        try:
            return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in (
                self.path(key, kind).stat() for kind in sorted(meta["sizes"])))
        except OSError:
            return None

    def intact(self, case: StoredCase) -> bool:
        """Whether a case's stored files are still the very files its handle
        was made from (a stat each, for a read served from memory; their
        sizes were checked against the record when the handle was made)."""
        now = self.stamp(case._key, case._meta)
        return now is not None and now == case._stamp

    def forget(self, key: str) -> None:
        """Drop a case: its commit first, then its arrays."""
        (self.folder / f"{key}.json").unlink(missing_ok=True)
        for kind in KINDS:
            self.path(key, kind).unlink(missing_ok=True)

    # ----------------------------------------------------------- preparing

    def load(self, ref: CaseRef, index: int, classes=None) -> StoredCase:
        """The case of ``ref`` from the store when its files are unchanged and
        its copy intact; else read (``load_case``: a DataError naming it when
        it cannot be used), prepared, written and returned."""
        from common.data.transforms import prepare_case

        key = self.case_key(ref)
        signature = source_signature(ref)
        meta = self._meta(key)
        if meta is not None and meta.get("signature") == signature \
                and meta.get("case_id") == ref.case_id:
            if self._valid(key, meta):
                self.reused += 1
                self.seen.append((key, ref.case_id, signature))
                return StoredCase(self, key, meta, self.prep)
            log.warning("%s case %r: its prepared copy is damaged; preparing it again",
                        self.split, ref.case_id)
        self.forget(key)
        case = load_case(ref, index, classes, volumes=self.layout == "volume")
        try:
            ready = prepare_case(case, self.prep, keep_source=self.split == "test")
        except DataError as exc:  # named like load_case's own: the case, its index
            exc.case, exc.case_index = ref.case_id, index
            exc.args = (f"case {ref.case_id!r}: {exc.problem}",)
            raise
        del case
        meta = self._write(key, ref, ready, signature)
        self.written += 1
        self.seen.append((key, ref.case_id, signature))
        return StoredCase(self, key, meta, self.prep)

    def _write(self, key: str, ref: CaseRef, ready: Case, signature: list) -> dict[str, Any]:
        arrays = {"image": np.asarray(ready.image, np.float32),
                  "label": np.asarray(ready.label, np.uint8)}
        if ready.source is not None:
            arrays["source"] = np.asarray(ready.source[0], np.uint8)
        meta: dict[str, Any] = {
            "format": FORMAT, "case_id": ref.case_id, "signature": signature,
            "spacing": list(ready.spacing), "shape": list(arrays["image"].shape),
            "shapes": {}, "dtypes": {}, "sizes": {},  # as stored
            "plane_counts": plane_counts(arrays["label"]).tolist(),
            "written": time.time(),
        }
        if ready.source is not None:
            meta["source_spacing"] = list(ready.source[1])
        slices = self.layout == "slices" and arrays["image"].ndim == 4
        for kind, array in arrays.items():
            stored = (np.ascontiguousarray(np.moveaxis(array, -1, 0))
                      if slices and kind != "source" else np.ascontiguousarray(array))
            meta["sizes"][kind] = _atomic_write(
                self.path(key, kind), lambda fh, a=stored: np.save(fh, a, allow_pickle=False))
            meta["shapes"][kind], meta["dtypes"][kind] = list(stored.shape), stored.dtype.str
            del stored
        _atomic_write(self.folder / f"{key}.json",  # the case's commit, last
                      lambda fh: fh.write(json.dumps(meta).encode()))
        return meta

    def finish(self) -> None:
        """After a complete read: drop the cases no longer listed, write the index."""
        keep = {key for key, _, _ in self.seen}
        for meta in self.folder.glob("*.json"):
            key = meta.name[:-len(".json")]
            if key not in ("key", "index") and key not in keep:
                self.forget(key)
        for npy in self.folder.glob("*.npy"):
            if npy.name.split(".", 1)[0] not in keep:
                npy.unlink(missing_ok=True)
        index = {"format": FORMAT, "site": str(self.site_dir), "split": self.split,
                 "preparation": repr(self.prep), "layout": self.layout,
                 "cases": [{"key": k, "case_id": c, "signature": s} for k, c, s in self.seen]}
        _atomic_write(self.folder / "index.json",
                      lambda fh: fh.write(json.dumps(index, indent=1).encode()))
        self.seen = []  # written: the handles that outlive this read need none of it
        self._evict()

    def _evict(self) -> None:
        """Keep the ``KEEP_SETS`` prepared sets of this site state read most
        recently (this one among them); older ones (another run's spacing or
        structures) are removed, so the state does not grow by a copy of the
        site with every run's settings."""
        import shutil

        sets = []
        for folder in self.folder.parent.iterdir():
            index = folder / "index.json"
            if folder.is_dir() and index.is_file():
                sets.append((index.stat().st_mtime_ns, folder))
        for _, folder in sorted(sets, reverse=True)[KEEP_SETS:]:
            if folder != self.folder:
                log.info("removed the prepared cases of an older run's settings (%s)",
                         folder.name)
                shutil.rmtree(folder, ignore_errors=True)
