"""Writing an RTSTRUCT (contours) from a label volume, as a treatment-planning
system exports one: each structure's outline on each slice of its CT series.

Used to make synthetic radiotherapy sites (``common.data.synthetic``); the
reader is ``common.data.readers``. Outlines come from scikit-image's
marching squares at the 0.5 level between pixel centres, so the reader's
point-in-polygon rasterisation (pixel centres) gives the mask back; holes are
inner outlines, filled even-odd, as RTSTRUCT readers expect.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
COLOURS = ([255, 0, 0], [0, 160, 255], [0, 200, 0], [255, 200, 0], [200, 0, 255])


def outlines(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines ``N x 2`` (row, column) of a 2D mask, holes included."""
    from skimage import measure

    padded = np.pad(mask.astype(np.float32), 1)  # outlines close at the border
    return [c[:-1] - 1 for c in measure.find_contours(padded, 0.5) if len(c) > 3]


def write_rtstruct(datasets: Sequence, labels: np.ndarray, roi_names: Sequence[str],
                   path: Path, uid_seed: str = "") -> None:
    """Write an RTSTRUCT for ``datasets`` (the series' slices, pydicom, in the
    order of ``labels``' first axis) from ``labels`` (``slices x rows x
    columns``, class ``i`` is ROI ``roi_names[i - 1]``)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as Seq
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=[uid_seed, str(path), *map(str, parts)])

    first = datasets[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_STORAGE
    meta.MediaStorageSOPInstanceUID = uid("rtstruct")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
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
            for outline in outlines(labels[k] == number):
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
