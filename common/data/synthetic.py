"""Synthetic hospitals: small DICOM datasets with site-specific scanners.

Each case is a CT-like volume (a DICOM series written with pydicom) with one to
three round lesions; the label is a DICOM SEG (written with highdicom) or a
NIfTI mask. Sites differ the way real scanners do: intensity scale and offset,
noise level, lesion contrast and a smooth bias field, so the federation is not
identically distributed. Sites alternate the two folder layouts (dataset.json,
imagesTr/labelsTr) and the two label formats, so every path of the site reader
runs in the demo.

Generated at run time, deterministic for a given seed; never committed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAPE = (64, 64)  # rows, columns
SLICES = 8
PIXEL_SPACING = 1.5  # mm
SLICE_SPACING = 3.0  # mm


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


def _series(
    stored: np.ndarray, case_id: str, site: int, scanner: Scanner, seed: int
) -> list:
    """pydicom datasets, one per slice, of a CT image series."""
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
        ds.ImagePositionPatient = [0.0, 0.0, float(k * SLICE_SPACING)]
        ds.SliceLocation = float(k * SLICE_SPACING)
        ds.PixelSpacing = [PIXEL_SPACING, PIXEL_SPACING]
        ds.SliceThickness = SLICE_SPACING
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


def _write_seg(datasets: list, mask: np.ndarray, path: Path, seed: int) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Tumor,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(entropy_srcs=[str(seed), str(path), "seg-series"]),
        series_number=2,
        sop_instance_uid=generate_uid(entropy_srcs=[str(seed), str(path), "seg"]),
        instance_number=1,
        manufacturer="fedseg",
        manufacturer_model_name="synthetic",
        software_versions="fedseg",
        device_serial_number="0",
    )
    seg.save_as(path)


def _write_nifti(mask: np.ndarray, path: Path) -> None:
    """The mask on the series' grid: axes (column, row, slice), RAS affine."""
    import nibabel as nib

    affine = np.diag([-PIXEL_SPACING, -PIXEL_SPACING, SLICE_SPACING, 1.0])  # LPS -> RAS
    data = np.transpose(mask.astype(np.uint8), (2, 1, 0))
    nib.save(nib.Nifti1Image(data, affine), str(path))


def write_site(
    folder: Path, site: int, n_train: int, n_test: int, seed: int = 0
) -> Path:
    """Write one synthetic hospital into ``folder`` (created; replaced atomically)."""
    folder = Path(folder)
    scanner = scanner_for(site)
    rng = np.random.default_rng([seed, site])
    use_datalist = site % 2 == 0  # even sites: dataset.json + SEG; odd: imagesTr + NIfTI
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        entries: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
        for split, count in (("training", n_train), ("test", n_test)):
            img_dir, lbl_dir = ("imagesTr", "labelsTr") if split == "training" else (
                "imagesTs", "labelsTs")
            for i in range(count):
                case_id = f"case_{'tr' if split == 'training' else 'ts'}{i:03d}"
                stored, mask = phantom(rng, scanner)
                datasets = _series(stored, case_id, site, scanner, seed)
                series_dir = tmp / img_dir / case_id
                series_dir.mkdir(parents=True)
                for k, ds in enumerate(datasets):
                    ds.save_as(series_dir / f"slice_{k:03d}.dcm", enforce_file_format=True)
                (tmp / lbl_dir).mkdir(exist_ok=True)
                if use_datalist:
                    label = f"{lbl_dir}/{case_id}.dcm"
                    _write_seg(datasets, mask, tmp / label, seed)
                else:
                    label = f"{lbl_dir}/{case_id}.nii.gz"
                    _write_nifti(mask, tmp / label)
                entries[split].append({"image": f"{img_dir}/{case_id}", "label": label})
        if use_datalist:
            (tmp / "dataset.json").write_text(
                json.dumps({"name": f"synthetic-{site}", "labels": {"0": "background",
                            "1": "lesion"}, **entries}, indent=1)
            )
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_federation(
    root: Path, n_sites: int, n_train: int = 6, n_test: int = 3, seed: int = 0
) -> list[Path]:
    """Write ``n_sites`` hospitals as ``root/hospital-<k>``; returns their folders."""
    return [
        write_site(Path(root) / f"hospital-{k}", k, n_train, n_test, seed)
        for k in range(n_sites)
    ]


def ensure_site(root: Path, site: int, n_train: int, n_test: int, seed: int = 0) -> Path:
    """The folder of synthetic hospital ``site``, written once per settings."""
    folder = Path(root) / f"seed{seed}-train{n_train}-test{n_test}" / f"hospital-{site}"
    marker = folder / ("dataset.json" if site % 2 == 0 else "imagesTs")
    if not marker.exists():
        write_site(folder, site, n_train, n_test, seed)
    return folder
