"""Using a federation's model at a hospital: load a saved model, segment new
images, write what viewers open (DICOM SEG for DICOM series, a NIfTI label
map for NIfTI, a PNG mask and overlay for PNG/JPEG), and score a model on a
site's test cases. Everything here runs at the site; nothing is sent.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from nibabel import orientations as ornt

from common.config import RunSettings
from common.data.readers import ImageMeta, file_kind, read_image
from common.data.transforms import normalise, select_channels
from common.errors import ConfigError, DataError, UnsupportedFormatError
from common.model import build_model
from common.training import predict

CONFIG_FILES = ("model-card.json", "summary.json")  # beside a model: its run's settings


def fedseg_version() -> str:
    try:
        return version("fedseg")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class SavedModel:
    """A federation's model as saved in a run folder or at a site."""

    path: Path
    settings: RunSettings
    model: torch.nn.Module
    sha256: str


def load_model(path: Path) -> SavedModel:
    """``final_model.pt`` (a state dict) with its run's settings, read from a
    ``model-card.json`` or ``summary.json`` beside it (or a checkpoint's own)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {path} not found")
    raw = path.read_bytes()  # read once: hashed and loaded
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise ConfigError(f"{path} is not a fedseg model: {exc}") from None
    config = obj.get("config") if isinstance(obj, dict) and "state_dict" in obj else None
    state = obj["state_dict"] if config is not None else obj
    if config is None:
        for name in CONFIG_FILES:
            side = path.with_name(name)
            if side.is_file():
                config = json.loads(side.read_text()).get("config")
                break
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise ConfigError(f"{path}: no run settings beside it (model-card.json or "
                          f"summary.json from its run folder): cannot rebuild the model")
    settings = RunSettings.from_run_config(config)
    model = build_model(settings.model)
    try:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    except RuntimeError as exc:
        raise ConfigError(f"{path} does not match the U-Net its settings describe: "
                          f"{str(exc).splitlines()[0]}") from None
    return SavedModel(path, settings, model.eval(), hashlib.sha256(raw).hexdigest())


def inverse(transform: np.ndarray) -> np.ndarray:
    """The nibabel orientation transform that undoes ``transform``."""
    inv = np.zeros_like(transform)
    for out_axis, (in_axis, flip) in enumerate(transform):
        inv[int(in_axis)] = (out_axis, flip)
    return inv


@dataclass
class Segmentation:
    """One input's result, on the reader's grid: ``mask`` spatial uint8 {0,1},
    ``probability`` spatial float32 (foreground), and what was read."""

    source: Path
    image: np.ndarray  # C x spatial, as read
    meta: ImageMeta
    mask: np.ndarray
    probability: np.ndarray


def segment(saved: SavedModel, source: Path, device: torch.device) -> Segmentation:
    """Segment one image (file or DICOM series folder) with ``saved``."""
    image, meta = read_image(Path(source))
    s = saved.settings
    spatial = image.ndim - 1
    if spatial < s.model.spatial_dims:
        raise UnsupportedFormatError(f"{Path(source).name} is {spatial}D; the model is "
                                     f"{s.model.spatial_dims}D")
    ready = normalise(select_channels(image, s.input_channels))
    probability = predict(saved.model, ready, s, device, probabilities=True)[0]
    return Segmentation(Path(source), image, meta, (probability > 0.5).astype(np.uint8),
                        probability.astype(np.float32))


# --------------------------------------------------------------------------- writers


def write_result(saved: SavedModel, result: Segmentation, out_dir: Path, *,
                 fractional: bool = False, label: str = "foreground") -> list[Path]:
    """Write ``result`` in the form its source's viewers open; the paths."""
    kind = file_kind(result.source)
    stem = _stem(result.source)
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "dicom-series":
        return [write_dicom_seg(saved, result, out_dir / f"{stem}_seg.dcm",
                                fractional=fractional, label=label)]
    if kind == "nifti":
        return [write_nifti(result, out_dir / f"{stem}_seg.nii.gz")]
    if kind == "pil":
        return write_png(result, out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png")
    return [write_dicom_seg(saved, result, out_dir / f"{stem}_seg.dcm",
                            fractional=fractional, label=label)]  # one (multi-frame) file


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp",
                   ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def write_nifti(result: Segmentation, out: Path) -> Path:
    """The label map on the source's own voxel grid and affine."""
    import nibabel as nib

    src = nib.load(str(result.source))
    mask = result.mask
    if result.meta.transform is not None and mask.ndim == 3:
        mask = ornt.apply_orientation(mask, inverse(result.meta.transform))
    mask = mask.reshape(src.shape)  # the reader squeezed singleton axes: put them back
    img = nib.Nifti1Image(mask.astype(np.uint8), src.affine)
    img.header.set_xyzt_units(*src.header.get_xyzt_units())
    nib.save(img, str(out))
    return out


def write_png(result: Segmentation, mask_out: Path, overlay_out: Path) -> list[Path]:
    """A 0/255 mask and the image with the mask drawn over it in red."""
    from PIL import Image

    Image.fromarray((result.mask * 255).astype(np.uint8)).save(mask_out)
    img = result.image
    rgb = np.repeat(img[:1], 3, axis=0) if img.shape[0] == 1 else img[:3]
    rgb = np.moveaxis(rgb, 0, -1).astype(np.float32)
    top = float(rgb.max()) or 1.0
    rgb = rgb / top * 255.0
    red = np.zeros_like(rgb)
    red[..., 0] = 255.0
    alpha = 0.45 * result.mask[..., None]
    Image.fromarray((rgb * (1 - alpha) + red * alpha).astype(np.uint8)).save(overlay_out)
    return [mask_out, overlay_out]


def write_dicom_seg(saved: SavedModel, result: Segmentation, out: Path, *,
                    fractional: bool = False, label: str = "foreground") -> Path:
    """A DICOM SEG (highdicom) referencing the source series: same study and
    frame of reference, per-frame references to the source slices, one
    segment of coded category and type, algorithm AUTOMATIC identified as
    fedseg with its version and the model's hash; new series and instance UIDs."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    folder = result.source
    values = result.probability if fractional else result.mask
    if folder.is_file():  # one DICOM file: a single frame, or frames last (the reader's)
        sources = [pydicom.dcmread(folder)]
        frames = values[None] if values.ndim == 2 else np.moveaxis(values, -1, 0)
        return _save_seg(hd, codes, saved, sources, frames, fractional, label, out)
    by_uid = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f)
        except Exception:  # noqa: BLE001 - not part of the series
            continue
        if "SOPInstanceUID" in ds:
            by_uid[str(ds.SOPInstanceUID)] = ds
    uids = result.meta.source_uids
    missing = [u for u in uids if u not in by_uid]
    if missing:
        raise DataError(f"{folder.name}: {len(missing)} source slice(s) could not be read back")
    sources = [by_uid[u] for u in uids]
    if values.ndim == 3 and result.meta.transform is not None:
        # back from the reader's RAS grid to slices x rows x columns, source order
        values = ornt.apply_orientation(values, inverse(result.meta.transform))
        frames = np.transpose(values, (2, 1, 0))
    else:
        frames = values[None] if values.ndim == 2 else values
    return _save_seg(hd, codes, saved, sources, frames, fractional, label, out)


def _save_seg(hd, codes, saved: SavedModel, sources, frames: np.ndarray, fractional: bool,
              label: str, out: Path) -> Path:
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label[:64],
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="fedseg", version=fedseg_version(),
            family=codes.cid7162.ArtificialIntelligence,
            parameters={"model-sha256": saved.sha256[:64]}))
    with warnings.catch_warnings():  # highdicom's doubts about the source's own values
        warnings.simplefilter("ignore", UserWarning)
        try:
            seg = _segmentation(hd, sources, frames, fractional, description, label)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise UnsupportedFormatError(f"cannot write a DICOM SEG for this source: {exc}"
                                         ) from None
    if "FrameOfReferenceUID" not in seg:  # General Image then needs PatientOrientation
        seg.PatientOrientation = sources[0].get("PatientOrientation", "")
    seg.save_as(out)
    return out


def _segmentation(hd, sources, frames, fractional, description, label):
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=(frames.astype(np.float32) if fractional
                     else frames.astype(np.uint8))[..., None],
        segmentation_type=(hd.seg.SegmentationTypeValues.FRACTIONAL if fractional
                           else hd.seg.SegmentationTypeValues.BINARY),
        segment_descriptions=[description],
        series_instance_uid=hd.UID(), series_number=int(sources[0].get("SeriesNumber", 0)
                                                        or 0) + 1000,
        sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="fedseg", manufacturer_model_name="fedseg U-Net",
        software_versions=fedseg_version(), device_serial_number="none",
        series_description=f"fedseg {label}"[:64], omit_empty_frames=False)

