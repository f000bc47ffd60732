"""Synthetic hospitals: small DICOM datasets with site-specific scanners.

Each case is a CT-like volume (a DICOM series written with pydicom) with one to
three round lesions; the label is a DICOM SEG (written with highdicom) or a
NIfTI mask. Sites differ the way real scanners do: intensity scale and offset,
noise level, lesion contrast and a smooth bias field, so the federation is not
identically distributed. Sites alternate the two folder layouts (dataset.json,
imagesTr/labelsTr) and the two label formats, so every path of the site reader
runs in the demo.

With ``labels`` (a label map, e.g. :data:`ORGAN_LESION`) a site draws
several structures per case instead: an organ with lesions inside it (and a
second organ beside it for a third structure), written with the map's values
and named in its ``dataset.json`` as the map says, so a test can also make a
site whose map disagrees with a run's. Those sites can also be 3D NIfTI
volumes or 2D PNG images (``image_format``), and thinner (``slices``).

Generated at run time, deterministic for a given seed; never committed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAPE = (64, 64)  # rows, columns
SLICES = 8
PIXEL_SPACING = 1.5  # mm
SLICE_SPACING = 3.0  # mm

# A site of several structures: value -> name, background first, then class 1, 2, ...
ORGAN_LESION = {0: "background", 1: "organ", 2: "lesion"}
# What class k of a several-structure site is drawn as (at most three):
ROLES = ("organ", "lesion", "neighbour")  # lesions lie inside the organ, the neighbour beside it
IMAGE_FORMATS = ("dicom", "nifti", "png")
LABEL_FORMATS = ("seg", "nifti", "rtstruct", "png")


@dataclass(frozen=True)
class Scanner:
    """How one site's scanner renders tissue (stored values = slope*x + intercept)."""

    scale: float  # stored units per unit of tissue contrast
    offset: float
    noise: float  # std of additive noise, in tissue units
    lesion_contrast: float  # lesion minus background, in tissue units
    bias: float  # amplitude of a smooth multiplicative bias field


SCANNERS = [
    Scanner(scale=400.0, offset=1000.0, noise=0.25, lesion_contrast=1.0, bias=0.10),
    Scanner(scale=150.0, offset=300.0, noise=0.40, lesion_contrast=1.4, bias=0.25),
    Scanner(scale=900.0, offset=2000.0, noise=0.30, lesion_contrast=-1.0, bias=0.15),
]


def scanner_for(site: int) -> Scanner:
    if site < len(SCANNERS):
        return SCANNERS[site]
    rng = np.random.default_rng(1000 + site)
    return Scanner(
        scale=float(rng.uniform(100, 1000)),
        offset=float(rng.uniform(200, 2000)),
        noise=float(rng.uniform(0.2, 0.45)),
        lesion_contrast=float(rng.choice([-1, 1]) * rng.uniform(0.9, 1.5)),
        bias=float(rng.uniform(0.05, 0.3)),
    )


def phantom(rng: np.random.Generator, scanner: Scanner) -> tuple[np.ndarray, np.ndarray]:
    """One case: ``(image, mask)``, both ``slices x rows x cols``; image in stored units."""
    z, y, x = np.meshgrid(
        np.arange(SLICES) * SLICE_SPACING,
        np.arange(SHAPE[0]) * PIXEL_SPACING,
        np.arange(SHAPE[1]) * PIXEL_SPACING,
        indexing="ij",
    )
    cy, cx = SHAPE[0] * PIXEL_SPACING / 2, SHAPE[1] * PIXEL_SPACING / 2
    body = ((y - cy) / (0.42 * SHAPE[0] * PIXEL_SPACING)) ** 2 + (
        (x - cx) / (0.46 * SHAPE[1] * PIXEL_SPACING)
    ) ** 2 <= 1.0
    tissue = np.where(body, 1.0, 0.0)
    # Smooth texture so the background is not flat.
    texture = sum(
        0.12 * np.sin(rng.uniform(0.05, 0.2) * x + rng.uniform(0, 6))
        * np.cos(rng.uniform(0.05, 0.2) * y + rng.uniform(0, 6))
        for _ in range(3)
    )
    mask = np.zeros(body.shape, bool)
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(5.0, 11.0)
        c = (
            rng.uniform(0.3, 0.7) * SLICES * SLICE_SPACING,
            cy + rng.uniform(-0.22, 0.22) * SHAPE[0] * PIXEL_SPACING,
            cx + rng.uniform(-0.25, 0.25) * SHAPE[1] * PIXEL_SPACING,
        )
        mask |= ((z - c[0]) / 1.6) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r
    mask &= body
    bias = 1.0 + scanner.bias * np.sin(x / 40.0 + rng.uniform(0, 6)) * np.cos(y / 50.0)
    signal = (tissue + texture * body + scanner.lesion_contrast * mask) * bias
    signal = signal + rng.normal(0.0, scanner.noise, signal.shape)
    stored = np.clip(signal * scanner.scale + scanner.offset, 0, 65535).astype(np.uint16)
    return stored, mask


def structures_phantom(rng: np.random.Generator, scanner: Scanner, n_structures: int,
                       slices: int = SLICES) -> tuple[np.ndarray, np.ndarray]:
    """One case of ``n_structures`` (1 to 3) nested and adjacent structures:
    ``(image, classes)``, both ``slices x rows x cols``; image in stored units,
    classes uint8 (0 background, 1 an organ, 2 lesions inside it, 3 a second
    organ beside the first). The organ spans the volume's middle slices and
    narrows towards its ends; with one slice (a 2D image) it is cut through
    its middle. The lesions' contrast against the organ is the scanner's
    ``lesion_contrast``."""
    if not 1 <= n_structures <= len(ROLES):
        raise ValueError(f"a synthetic case draws 1 to {len(ROLES)} structures, "
                         f"not {n_structures}")
    z, y, x = np.meshgrid(
        np.arange(slices) * SLICE_SPACING,
        np.arange(SHAPE[0]) * PIXEL_SPACING,
        np.arange(SHAPE[1]) * PIXEL_SPACING,
        indexing="ij",
    )
    height, width = SHAPE[0] * PIXEL_SPACING, SHAPE[1] * PIXEL_SPACING
    cy, cx, cz = height / 2, width / 2, (slices - 1) * SLICE_SPACING / 2
    depth = max(slices, 2) * SLICE_SPACING
    body = ((y - cy) / (0.42 * height)) ** 2 + ((x - cx) / (0.46 * width)) ** 2 <= 1.0
    texture = sum(
        0.12 * np.sin(rng.uniform(0.05, 0.2) * x + rng.uniform(0, 6))
        * np.cos(rng.uniform(0.05, 0.2) * y + rng.uniform(0, 6))
        for _ in range(3)
    )

    def ellipsoid(centre, radii) -> np.ndarray:
        return sum(((a - c) / r) ** 2 for a, c, r in zip((z, y, x), centre, radii,
                                                          strict=True)) <= 1.0

    organ_c = (cz, cy + rng.uniform(-0.06, 0.06) * height,
               cx - rng.uniform(0.08, 0.14) * width)
    organ_r = (rng.uniform(0.45, 0.6) * depth, rng.uniform(0.18, 0.24) * height,
               rng.uniform(0.17, 0.22) * width)
    organ = ellipsoid(organ_c, organ_r) & body
    classes = np.where(organ, 1, 0).astype(np.uint8)
    signal = np.where(body, 1.0, 0.0) + texture * body + 0.8 * organ
    if n_structures >= 2:
        lesion = np.zeros(body.shape, bool)
        for _ in range(int(rng.integers(1, 3))):
            r = rng.uniform(7.0, 10.0)
            c = tuple(oc + rng.uniform(-0.45, 0.45) * orr
                      for oc, orr in zip(organ_c, organ_r, strict=True))
            lesion |= ellipsoid(c, (1.6 * r, r, r))
        lesion &= organ
        classes[lesion] = 2
        signal = signal + scanner.lesion_contrast * lesion
    if n_structures >= 3:
        near_c = (cz, cy + rng.uniform(-0.08, 0.08) * height,
                  cx + rng.uniform(0.16, 0.22) * width)
        near = ellipsoid(near_c, (0.4 * depth, rng.uniform(0.11, 0.15) * height,
                                  rng.uniform(0.08, 0.11) * width)) & body & ~organ
        classes[near] = 3
        signal = signal + 1.6 * near
    bias = 1.0 + scanner.bias * np.sin(x / 40.0 + rng.uniform(0, 6)) * np.cos(y / 50.0)
    signal = signal * bias + rng.normal(0.0, scanner.noise, signal.shape)
    stored = np.clip(signal * scanner.scale + scanner.offset, 0, 65535).astype(np.uint16)
    return stored, classes


def _series(
    stored: np.ndarray, case_id: str, site: int, scanner: Scanner, seed: int,
    spacing: tuple[float, float] = (PIXEL_SPACING, SLICE_SPACING),
) -> list:
    """pydicom datasets, one per slice, of a CT image series (``spacing``:
    pixel and slice spacing in mm)."""
    pixel_spacing, slice_spacing = spacing
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=[str(p) for p in (seed, site, case_id, *parts)])

    study, series, frame = uid("study"), uid("series"), uid("frame")
    datasets = []
    for k in range(stored.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid("slice", k)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName = f"SYNTHETIC^{case_id}"
        ds.PatientID = f"SYN-{site}-{case_id}"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "", "1", ""
        ds.Modality, ds.Manufacturer = "CT", f"fedseg synthetic scanner {site}"
        ds.ManufacturerModelName, ds.DeviceSerialNumber = "phantom", str(site)
        ds.SoftwareVersions = "fedseg"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(k * slice_spacing)]
        ds.SliceLocation = float(k * slice_spacing)
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.SliceThickness = slice_spacing
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -scanner.offset  # CT: Hounsfield units
        ds.PatientPosition, ds.AcquisitionNumber, ds.BodyPartExamined = "HFS", 1, "ABDOMEN"
        ds.KVP = 120
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        datasets.append(ds)
    return datasets


def _write_segments(datasets: list, classes: np.ndarray, names: list[str], path: Path,
                    seed: int, roles: tuple[str, ...] = ROLES) -> None:
    """A DICOM SEG of one segment per structure (class ``i`` is segment ``i``,
    labelled ``names[i - 1]``), coded by what it is drawn as (``roles``)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    coded = {"lesion": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Tumor)}
    organ = (codes.SCT.AnatomicalStructure, codes.SCT.Organ)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i, segment_label=name,
            segmented_property_category=coded.get(roles[i - 1], organ)[0],
            segmented_property_type=coded.get(roles[i - 1], organ)[1],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for i, name in enumerate(names, start=1)]
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=np.stack([classes == i for i in range(1, len(names) + 1)],
                             axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(entropy_srcs=[str(seed), str(path), "seg-series"]),
        series_number=2,
        sop_instance_uid=generate_uid(entropy_srcs=[str(seed), str(path), "seg"]),
        instance_number=1, manufacturer="fedseg", manufacturer_model_name="synthetic",
        software_versions="fedseg", device_serial_number="0", omit_empty_frames=False)
    seg.save_as(path)


AFFINE = np.diag([-PIXEL_SPACING, -PIXEL_SPACING, SLICE_SPACING, 1.0])  # the series': LPS -> RAS


def _smallest(array: np.ndarray) -> np.ndarray:
    """``array`` as uint8 when its values fit, else uint16 (a mask, a label
    map's values or the scanner's stored values)."""
    fits = array.dtype == bool or int(array.max(initial=0)) <= 255
    return array.astype(np.uint8 if fits else np.uint16)


def _write_nifti(array: np.ndarray, path: Path,
                 spacing: tuple[float, float] = (PIXEL_SPACING, SLICE_SPACING)) -> None:
    """A mask, label map or image ``slices x rows x cols`` on the series'
    grid: axes (column, row, slice), RAS affine."""
    import nibabel as nib

    affine = np.diag([-spacing[0], -spacing[0], spacing[1], 1.0])
    nib.save(nib.Nifti1Image(np.transpose(_smallest(array), (2, 1, 0)), affine), str(path))


def rescan(stored: np.ndarray, classes: np.ndarray, spacing: tuple[float, float],
           hu_offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A phantom (``slices x rows x cols`` at the default spacing) as a scanner
    of ``spacing`` (pixel, slice; mm) would give it: the same anatomy on that
    grid (images linearly, labels by nearest neighbour), its Hounsfield
    units shifted by ``hu_offset`` (a miscalibrated scanner)."""
    from common.data.harmonise import resize

    dtype = classes.dtype
    old = (SLICE_SPACING, PIXEL_SPACING, PIXEL_SPACING)
    new = (spacing[1], spacing[0], spacing[0])
    shape = tuple(max(1, round(n * o / t)) for n, o, t in zip(stored.shape, old, new,
                                                            strict=True))
    if shape != stored.shape:
        stored = resize(stored[None].astype(np.float32), shape)[0]
        classes = resize(classes[None].astype(np.int16), shape, labels=True)[0]
    stored = np.clip(np.rint(stored.astype(np.float64) + hu_offset), 0, 65535)
    return stored.astype(np.uint16), classes.astype(dtype)


def _write_png(array: np.ndarray, path: Path) -> None:
    """A 2D image (16-bit grey: the stored values) or label map (8-bit where its
    values fit)."""
    from PIL import Image

    Image.fromarray(_smallest(array)).save(path)


def _file_values(labels: Mapping[int, str]) -> np.ndarray:
    """Class index -> the value the label files hold for it (``labels``' order)."""
    values = np.array([int(v) for v in labels], np.int64)
    if len(set(values.tolist())) != len(values) or values.min() < 0 or values.max() > 65535:
        raise ValueError(f"label values must be distinct and in 0..65535, got {list(labels)}")
    return values


def write_site(
    folder: Path, site: int, n_train: int, n_test: int, seed: int = 0, *,
    labels: Mapping[int, str] | None = None, image_format: str = "dicom",
    label_format: str | None = None, slices: int = SLICES,
    spacing: tuple[float, float] | None = None, hu_offset: float = 0.0,
) -> Path:
    """Write one synthetic hospital into ``folder`` (created; replaced atomically).

    Without ``labels``: round lesions in DICOM series; even sites with
    ``dataset.json`` and DICOM SEG labels, odd sites with ``imagesTr/`` and
    NIfTI labels, unless ``label_format`` says otherwise.

    ``labels``: the label map to draw and write, value -> name in class
    order: the first entry is the background's, the ``k``-th after it class
    ``k``, drawn as ``ROLES[k - 1]`` (organ, lesions inside it, a second organ
    beside it). The label files hold those values, segments and ROIs carry
    those names, and ``dataset.json`` (always written) says the map as given:
    a different name or value makes a site whose map disagrees with a run's.
    ``image_format``: ``dicom`` (series), ``nifti`` (volumes) or ``png`` (2D
    images: one slice, 16-bit). ``label_format`` for DICOM series: ``seg``,
    ``nifti`` or ``rtstruct`` (default: by site, as without ``labels``);
    NIfTI and PNG images have labels of their own format. ``slices``: slices
    per volume (fewer than a 3D patch is a thin volume). ``spacing`` (pixel,
    slice; mm) and ``hu_offset``: the same anatomy as another scanner gives it
    (:func:`rescan`; default: 1.5 x 1.5 x 3 mm, calibrated).
    """
    folder = Path(folder)
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if labels is None and (image_format != "dicom" or slices != SLICES):
        raise ValueError("NIfTI and PNG images and other slice counts need labels "
                         "(e.g. ORGAN_LESION); the default site keeps its own form")
    own = {"nifti": "nifti", "png": "png"}.get(image_format)
    if own is not None and label_format not in (None, own):
        raise ValueError(f"{image_format} images cannot have {label_format} labels (they "
                         f"have {own} labels)")
    label_format = own or label_format or ("seg" if site % 2 == 0 else "nifti")
    if label_format not in LABEL_FORMATS or (own is None and label_format == "png"):
        raise ValueError(f"{image_format} images cannot have {label_format} labels")
    scanner = scanner_for(site)
    rng = np.random.default_rng([seed, site])
    use_datalist = labels is not None or site % 2 == 0  # else imagesTr + labelsTr only
    values = _file_values(labels) if labels is not None else None
    names = [str(n) for n in labels.values()][1:] if labels is not None else ["lesion"]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        entries: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
        for split, count in (("training", n_train), ("test", n_test)):
            img_dir, lbl_dir = ("imagesTr", "labelsTr") if split == "training" else (
                "imagesTs", "labelsTs")
            for i in range(count):
                case_id = f"case_{'tr' if split == 'training' else 'ts'}{i:03d}"
                if values is None:
                    stored, classes = phantom(rng, scanner)
                else:
                    stored, classes = structures_phantom(
                        rng, scanner, len(names), 1 if image_format == "png" else slices)
                if spacing is not None or hu_offset:
                    stored, classes = rescan(stored, classes,
                                             spacing or (PIXEL_SPACING, SLICE_SPACING),
                                             hu_offset)
                grid = spacing or (PIXEL_SPACING, SLICE_SPACING)
                written = classes if values is None else values[classes]  # file values
                (tmp / img_dir).mkdir(exist_ok=True)
                (tmp / lbl_dir).mkdir(exist_ok=True)
                if image_format == "png":
                    image = f"{img_dir}/{case_id}.png"
                    _write_png(stored[0], tmp / image)
                elif image_format == "nifti":
                    image = f"{img_dir}/{case_id}.nii.gz"
                    _write_nifti(stored, tmp / image, grid)
                else:
                    datasets = _series(stored, case_id, site, scanner, seed, grid)
                    image = f"{img_dir}/{case_id}"
                    (tmp / image).mkdir()
                    for k, ds in enumerate(datasets):
                        ds.save_as(tmp / image / f"slice_{k:03d}.dcm", enforce_file_format=True)
                suffix = {"seg": ".dcm", "rtstruct": ".dcm", "nifti": ".nii.gz", "png": ".png"}
                label = f"{lbl_dir}/{case_id}{suffix[label_format]}"
                if label_format == "seg":  # the default sites: one segment, a lesion
                    _write_segments(datasets, classes, names, tmp / label, seed,
                                    ROLES if values is not None else ("lesion",))
                elif label_format == "rtstruct":
                    from common.data.rtstruct import write_rtstruct

                    write_rtstruct(datasets, classes, names, tmp / label, uid_seed=str(seed))
                elif label_format == "png":
                    _write_png(written[0], tmp / label)
                else:
                    _write_nifti(written, tmp / label, grid)
                entries[split].append({"image": image, "label": label})
        if use_datalist:
            spec = ({str(k): v for k, v in labels.items()} if labels is not None
                    else {"0": "background", "1": "lesion"})
            (tmp / "dataset.json").write_text(
                json.dumps({"name": f"synthetic-{site}", "labels": spec, **entries}, indent=1)
            )
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_federation(
    root: Path, n_sites: int, n_train: int = 6, n_test: int = 3, seed: int = 0, **options
) -> list[Path]:
    """Write ``n_sites`` hospitals as ``root/hospital-<k>``; returns their folders.
    ``options``: :func:`write_site`'s (``labels``, ``image_format``, ...)."""
    return [
        write_site(Path(root) / f"hospital-{k}", k, n_train, n_test, seed, **options)
        for k in range(n_sites)
    ]


def ensure_site(root: Path, site: int, n_train: int, n_test: int, seed: int = 0) -> Path:
    """The folder of synthetic hospital ``site``, written once per settings."""
    folder = Path(root) / f"seed{seed}-train{n_train}-test{n_test}" / f"hospital-{site}"
    marker = folder / ("dataset.json" if site % 2 == 0 else "imagesTs")
    if not marker.exists():
        write_site(folder, site, n_train, n_test, seed)
    return folder
