"""RTSTRUCT (contours) to the run's classes, and back.

Reading (:func:`read_rtstruct`, called by :func:`common.data.readers.read_label`
with the case's image, a DICOM series): each ROI is found in the site's label
map by its name (``ROIName``), the run's name or the site's
``label_aliases``; ROIs that match no structure are left out (logged at the
site), a structure of the run that no ROI holds makes the case a data error.
Each CLOSED_PLANAR contour goes onto the slice it references (or, without a
reference, the slice it lies in), its points from patient space (mm) to
(row, column) through the slice's position, orientation and pixel spacing, and
is filled where pixel centres lie inside it (:func:`fill`, scanlines).
Contours of one ROI on one slice combine even-odd, so an inner contour is a
hole, as the standard and treatment-planning systems draw them; ROIs of one
structure join. Where ROIs of two structures overlap, the structure later in
the run's ``structures`` wins (as for DICOM SEG). Points and OPEN_PLANAR lines
carry no area and are left out; an ROI listed without any closed contour is a
structure not drawn, a :class:`StructureMissingError` like a missing ROI.

The fill is ours, not scikit-image's ``draw.polygon`` (which gives the same
pixels, see the tests): that one tests each pixel of the bounding box against
each edge, seconds for one long contour; scanlines cost the edges plus the
rows they cross. rt-utils (OpenCV underneath, thin maintenance) and
dicompyler-core (unmaintained) were not taken; highdicom has no RTSTRUCT
reader.

Writing (:func:`write_rtstruct`) makes synthetic radiotherapy sites
(``common.data.synthetic``): outlines from marching squares at the 0.5 level
between pixel centres, so the reader's fill gives the mask back exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.data.dicom_values import _int_attr
from common.data.labels import Classes, StructureMissingError, classes_of_named
from common.errors import DataError, UnreadableFileError

log = logging.getLogger(__name__)

RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
COLOURS = ([255, 0, 0], [0, 160, 255], [0, 200, 0], [255, 200, 0], [200, 0, 255])


# An RTSTRUCT is text: bound what one may ask of the reader
MAX_FILE_BYTES = 1 << 28  # 256 MiB: far above the largest plans' structure sets
MAX_POINTS = 1 << 24  # contour points in one file
MAX_CONTOURS = 1 << 18
MAX_CROSSINGS = 1 << 26  # (contour edge, pixel row) crossings the fill may compute
MAX_CONTOUR_CROSSINGS = 1 << 22  # ... for one contour (its arrays: about 170 MB)
FAR = 16  # a contour point this many image widths away is not on the image


def read_rtstruct(ds, name: str, meta, classes: Classes) -> np.ndarray:
    """The run's classes from RTSTRUCT ``ds`` (file ``name``) on the stored grid
    of the image series ``meta`` describes (:class:`common.data.readers.ImageMeta`):
    ``slices x rows x columns`` uint8, slices in ``meta.source_uids``' order.

    A structure of the run whose ROIs hold no closed contour at all (listed
    but never drawn) is a :class:`StructureMissingError`, as a missing ROI is:
    not drawn is not the same as absent."""
    geometry = meta.geometry
    if geometry is None:
        raise DataError(
            f"RTSTRUCT {name} draws contours in patient space, but the case's image is not "
            f"a DICOM series with a slice geometry (ImagePositionPatient, "
            f"ImageOrientationPatient): give the case its CT/MR series folder as the image")
    rois = _seq(ds, "StructureSetROISequence", name)
    found: dict[int, list[str]] = {}
    for roi in rois:
        number = _number(roi, "ROINumber", name)
        found[number] = [str(getattr(roi, "ROIName", "") or "").strip() or f"ROI {number}"]
    roi_class = classes_of_named(found, classes, f"RTSTRUCT {name}", "ROI")

    uid_slice = {uid: k for k, uid in enumerate(meta.source_uids)}
    if meta.frames:  # one multi-frame image: a contour on it names its frame
        uid_slice = {meta.source_uids[0]: {f: k for k, f in enumerate(meta.frames)}}
    _check_references(ds, name, uid_slice)
    rows, columns = geometry.shape
    row_dir, col_dir = geometry.orientation[:3], geometry.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    depth = geometry.positions @ normal  # each slice along the normal
    gap = float(np.median(np.abs(np.diff(np.sort(depth))))) if len(depth) > 1 else 1.0
    tolerance = max(gap / 2.0, 1e-3)
    by_class = {c: np.zeros((len(depth), rows, columns), bool) for c in set(roi_class.values())}
    drawn: set[int] = set()  # classes with at least one closed contour
    budget = _Budget(name)
    moved: list[tuple[int, int]] = []  # contours whose reference names another slice
    for roi_contour in _seq(ds, "ROIContourSequence", name, required=False):
        cls = roi_class.get(_number(roi_contour, "ReferencedROINumber", name))
        if cls is None:
            continue
        roi: dict[int, np.ndarray] = {}  # slice -> this ROI's pixels, even-odd within it
        for contour in getattr(roi_contour, "ContourSequence", None) or []:
            budget.contour()
            if str(getattr(contour, "ContourGeometricType", "")).strip() != "CLOSED_PLANAR":
                continue  # a point or an open line: no area
            points = _points(contour, name)
            budget.points(len(points))
            k = _slice_of(contour, points, uid_slice, depth, normal, tolerance, name, moved)
            offset = points - geometry.positions[k]
            r = offset @ col_dir / geometry.spacing[0]  # along the column: the row index
            c = offset @ row_dir / geometry.spacing[1]
            reach = FAR * max(rows, columns)
            if np.abs(r).max() > reach or np.abs(c).max() > reach:
                raise DataError(f"RTSTRUCT {name} has a contour that reaches far outside its "
                                f"slice ({rows} x {columns} pixels): not drawn on this series")
            inside = fill(r, c, (rows, columns), budget)
            roi[k] = roi[k] ^ inside if k in roi else inside
            drawn.add(cls)
        for k, pixels in roi.items():  # ROIs of one structure join
            by_class[cls][k] |= pixels
    if moved:  # the site's log only: it names the file
        referenced, lying = moved[0]
        log.warning("RTSTRUCT %s: %d contour(s) reference another slice than the one their "
                    "points lie on (the first references slice %d of %d in position order, "
                    "its points lie on slice %d); drawn where their points lie, which define "
                    "a contour (check the file's export if the structure looks wrong)",
                    name, len(moved), referenced + 1, len(depth), lying + 1)
    for cls in sorted(set(roi_class.values()) - drawn):
        structure = classes.structures[cls - 1]
        rois_of = ", ".join(repr(found[n][0]) for n, c in roi_class.items() if c == cls)
        raise StructureMissingError(
            f"RTSTRUCT {name} lists {rois_of} for {structure!r} but draws no closed contour "
            f"of it: a structure not drawn is not known to be absent, so the case is left "
            f"out (draw it, or leave the case out of the dataset)", structure=structure)
    out = np.zeros((len(depth), rows, columns), np.uint8)
    for cls in sorted(by_class):  # later structures over earlier ones
        out[by_class[cls]] = cls
    return out


class _Budget:
    """What one file may make the reader do (contours, points, fill work)."""

    def __init__(self, name: str) -> None:
        self.name, self.contours, self.seen, self.crossings = name, 0, 0, 0

    def contour(self) -> None:
        self.contours += 1
        if self.contours > MAX_CONTOURS:
            raise UnreadableFileError(f"RTSTRUCT {self.name} holds more than {MAX_CONTOURS} "
                                      f"contours")

    def points(self, n: int) -> None:
        self.seen += n
        if self.seen > MAX_POINTS:
            raise UnreadableFileError(f"RTSTRUCT {self.name} holds more than {MAX_POINTS} "
                                      f"contour points")

    def fill(self, n: int) -> None:
        self.crossings += n
        if self.crossings > MAX_CROSSINGS or n > MAX_CONTOUR_CROSSINGS:
            raise UnreadableFileError(
                f"RTSTRUCT {self.name}: its contours cross the image's pixel rows more than "
                f"{MAX_CONTOUR_CROSSINGS} times in one contour or {MAX_CROSSINGS} in all "
                f"(zig-zag contours?); not read")


def _seq(ds, keyword: str, name: str, required: bool = True):
    value = getattr(ds, keyword, None)
    if required and not value:
        raise UnreadableFileError(f"RTSTRUCT {name} has no {keyword}, which an RTSTRUCT needs")
    return value or []


def _number(item, keyword: str, name: str) -> int:
    """A whole-number attribute of an RTSTRUCT item (the readers' check)."""
    number = _int_attr(item, keyword, name, None, low=0)
    if number is None:
        raise UnreadableFileError(f"RTSTRUCT {name} has an item without {keyword}")
    return number


def _points(contour, name: str) -> np.ndarray:
    """A contour's points, ``N x 3`` (mm), checked. Parsed from the element's
    bytes where pydicom has not converted them (no Python object per number;
    also what a value over 64 KiB in explicit VR comes back as: ``UN``)."""
    element = contour.get_item("ContourData") if "ContourData" in contour else None
    raw = getattr(element, "value", None)
    try:
        if isinstance(raw, bytes | bytearray):
            text = bytes(raw).rstrip(b"\x00 ")
            values = np.array(text.split(b"\\") if text else [], np.float64)
        else:
            single = raw is None or isinstance(raw, str | int | float)
            items = ([] if raw is None else [raw]) if single else list(raw)
            values = np.array([float(v) for v in items], np.float64)
    except (TypeError, ValueError):
        raise UnreadableFileError(f"RTSTRUCT {name}: a contour's ContourData is not numbers"
                                  ) from None
    if len(values) < 9 or len(values) % 3 or not np.isfinite(values).all():
        raise UnreadableFileError(
            f"RTSTRUCT {name}: a closed contour holds {len(values)} coordinates; it needs "
            f"three per point, at least three points, all finite")
    return values.reshape(-1, 3)


def _check_references(ds, name: str, uid_slice: dict[str, int | dict[int, int]]) -> None:
    """The images the RTSTRUCT says it was drawn on must be the case's series:
    a data error naming how many are missing otherwise."""
    referenced: list[str] = []
    for frame in getattr(ds, "ReferencedFrameOfReferenceSequence", None) or []:
        for study in getattr(frame, "RTReferencedStudySequence", None) or []:
            for series in getattr(study, "RTReferencedSeriesSequence", None) or []:
                referenced += [str(getattr(i, "ReferencedSOPInstanceUID", "")).strip()
                               for i in getattr(series, "ContourImageSequence", None) or []]
    missing = [u for u in dict.fromkeys(referenced) if u not in uid_slice]
    if missing:
        held = len(set(referenced)) - len(missing)
        raise DataError(
            f"RTSTRUCT {name} was drawn on {len(set(referenced))} image(s), {len(missing)} of "
            f"which are not in the case's image series ({held} are): the referenced images "
            f"are missing; export the RTSTRUCT with its whole CT/MR series")


def _slice_of(contour, points: np.ndarray, uid_slice: dict[str, int | dict[int, int]],
              depth: np.ndarray, normal: np.ndarray, tolerance: float, name: str,
              moved: list[tuple[int, int]]) -> int:
    """The slice a contour lies on. Its points define it (ContourData, in
    patient coordinates): where they lie on a slice, that slice, even where
    the image (or frame of a multi-frame image) it references is another, a
    disagreement added to ``moved`` as (referenced, lying on) for the file's
    warning; where they lie on no slice, the referenced one (a contour a
    little off its plane), else a DataError."""
    along = float(np.mean(points @ normal))
    k = int(np.argmin(np.abs(depth - along)))
    on_slice = abs(depth[k] - along) <= tolerance
    for image in getattr(contour, "ContourImageSequence", None) or []:
        uid = str(getattr(image, "ReferencedSOPInstanceUID", "")).strip()
        referenced = uid_slice.get(uid)
        if isinstance(referenced, dict):  # a multi-frame image: by frame number
            frame = getattr(image, "ReferencedFrameNumber", None)
            try:
                referenced = referenced[int(frame)]
            except (KeyError, TypeError, ValueError):
                break  # no frame of the image named: where the points are
        if referenced is None:
            raise DataError(f"RTSTRUCT {name} has a contour on an image that is not in the "
                            f"case's image series: the referenced image is missing")
        if on_slice and k != referenced:
            moved.append((referenced, k))
            return k
        return referenced
    if not on_slice:
        raise DataError(f"RTSTRUCT {name} has a contour {along:.1f} mm along the slice "
                        f"normal, on no slice of the case's image series")
    return k


def fill(r: np.ndarray, c: np.ndarray, shape: tuple[int, int],
         budget: _Budget | None = None) -> np.ndarray:
    """The pixels whose centres lie inside the closed polygon of rows ``r`` and
    columns ``c`` (even-odd), by scanlines: each edge crosses the pixel rows
    from its lower end up to, not including, its upper end; on each row the
    crossings, sorted, pair up into runs of inside pixels. The work is the
    edges plus the rows they cross, not (as a point-in-polygon test per pixel)
    the bounding box times the edges."""
    rows, cols = shape
    r1, c1 = np.roll(r, -1), np.roll(c, -1)
    first = np.clip(np.ceil(np.minimum(r, r1)), 0, rows).astype(np.int64)
    last = np.clip(np.ceil(np.maximum(r, r1)), 0, rows).astype(np.int64)
    counts = last - first  # rows y with low <= y < high; 0 for a flat edge
    total = int(counts.sum())
    if budget is not None:
        budget.fill(total)
    mask = np.zeros(shape, bool)
    if total == 0:
        return mask
    edge = np.repeat(np.arange(len(r)), counts)
    y = np.repeat(first, counts) + np.arange(total) - np.repeat(np.cumsum(counts) - counts,
                                                                  counts)
    x = c[edge] + (y - r[edge]) * (c1[edge] - c[edge]) / (r1[edge] - r[edge])
    order = np.lexsort((x, y))  # by row, then along it: each row's crossings pair up
    y, x = y[order], x[order]
    start = np.clip(np.ceil(x[0::2]), 0, cols).astype(np.int64)  # columns x0 <= col < x1
    stop = np.clip(np.ceil(x[1::2]), 0, cols).astype(np.int64)
    runs = np.zeros((rows, cols + 1), np.int32)
    np.add.at(runs, (y[0::2], start), 1)
    np.add.at(runs, (y[0::2], stop), -1)
    return np.cumsum(runs, axis=1)[:, :cols] > 0


def outlines(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines ``N x 2`` (row, column) of a 2D mask, holes included."""
    from skimage import measure

    padded = np.pad(mask.astype(np.float32), 1)  # outlines close at the border
    return [c[:-1] - 1 for c in measure.find_contours(padded, 0.5) if len(c) > 3]


def write_rtstruct(datasets: Sequence, labels: np.ndarray, roi_names: Sequence[str],
                   path: Path, uid_seed: str = "") -> None:
    """Write an RTSTRUCT for ``datasets`` (the series' slices, pydicom, in the
    order of the slices in ``labels``) from ``labels``: ``slices x rows x
    columns`` classes (class ``i`` is ROI ``roi_names[i - 1]``), or ``ROIs x
    slices x rows x columns`` masks, one per ROI, which may overlap (as a
    structure set's body, organs and target volumes do)."""
    labels = np.asarray(labels)
    if labels.ndim == 4 and len(labels) != len(roi_names):
        raise ValueError(f"{len(labels)} ROI masks for {len(roi_names)} ROI names")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as Seq
    from pydicom.uid import ImplicitVRLittleEndian, generate_uid

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=[uid_seed, str(path), *map(str, parts)])

    first = datasets[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_STORAGE
    meta.MediaStorageSOPInstanceUID = uid("rtstruct")
    # implicit VR: a contour's ContourData may pass explicit VR's 64 KiB length limit
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_STORAGE, meta.MediaStorageSOPInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
                    "AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, keyword, getattr(first, keyword, ""))
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", uid("series"), 3
    ds.Manufacturer, ds.InstanceNumber = "fedseg", 1
    ds.StructureSetLabel, ds.StructureSetDate, ds.StructureSetTime = "fedseg", "20260101", "1200"
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = first.FrameOfReferenceUID, ""

    def image_ref(slice_ds) -> Dataset:
        ref = Dataset()
        ref.ReferencedSOPClassUID = slice_ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = slice_ds.SOPInstanceUID
        return ref

    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = Seq([image_ref(s) for s in datasets])
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = Seq([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = Seq([study])
    ds.ReferencedFrameOfReferenceSequence = Seq([frame])

    rois, contours, observations = [], [], []
    for number, name in enumerate(roi_names, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = number, first.FrameOfReferenceUID
        roi.ROIName, roi.ROIGenerationAlgorithm = name, "MANUAL"
        rois.append(roi)
        items = []
        for k, slice_ds in enumerate(datasets):
            origin = np.array(slice_ds.ImagePositionPatient, float)
            iop = np.array(slice_ds.ImageOrientationPatient, float)
            row_sp, col_sp = (float(v) for v in slice_ds.PixelSpacing)
            mask = labels[number - 1, k] > 0 if labels.ndim == 4 else labels[k] == number
            for outline in outlines(mask):
                points = (origin + outline[:, 1:2] * col_sp * iop[:3]
                          + outline[:, 0:1] * row_sp * iop[3:])
                item = Dataset()
                item.ContourImageSequence = Seq([image_ref(slice_ds)])
                item.ContourGeometricType = "CLOSED_PLANAR"
                item.NumberOfContourPoints = len(points)
                item.ContourData = [f"{v:.3f}" for v in points.ravel()]
                items.append(item)
        contour = Dataset()
        contour.ROIDisplayColor = COLOURS[(number - 1) % len(COLOURS)]
        contour.ReferencedROINumber = number
        contour.ContourSequence = Seq(items)
        contours.append(contour)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
        observations.append(observation)
    ds.StructureSetROISequence = Seq(rois)
    ds.ROIContourSequence = Seq(contours)
    ds.RTROIObservationsSequence = Seq(observations)
    ds.save_as(path, enforce_file_format=True)
