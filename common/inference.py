"""Using a federation's model at a hospital: load a saved model, segment new
images, write what viewers open (DICOM SEG for DICOM series, a NIfTI label
map for NIfTI, a PNG mask and overlay for PNG/JPEG), and score a model on a
site's test cases. Everything here runs at the site; nothing is sent.

A model of one structure writes a binary result (as before structures had
names). A model of several (run setting ``structures``) writes every one:
a DICOM SEG of one segment per structure, a NIfTI and a PNG label map of
class values (0 background, ``i`` the ``i``-th structure) with the names in
a ``<stem>_labels.json`` beside them (``dataset.json``'s ``labels`` form).
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

from common.config import BACKGROUND, FOREGROUND, RunSettings
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
    """One input's result, on the reader's grid: ``mask`` the label map,
    spatial uint8 (0 background, ``i`` the ``i``-th of ``structures``: {0, 1}
    for a one-structure model), ``probabilities`` every class's, ``K x
    spatial`` float32 (K = 1 + structures), and what was read."""

    source: Path
    image: np.ndarray  # C x spatial, as read
    meta: ImageMeta
    mask: np.ndarray
    probabilities: np.ndarray
    structures: tuple[str, ...] = (FOREGROUND,)

    @property
    def multiclass(self) -> bool:
        return len(self.structures) > 1

    def voxels(self) -> dict[str, int]:
        """Voxels (pixels) of each structure, by name."""
        counts = np.bincount(self.mask.ravel(), minlength=1 + len(self.structures))
        return {name: int(counts[i + 1]) for i, name in enumerate(self.structures)}


def segment(saved: SavedModel, source: Path, device: torch.device) -> Segmentation:
    """Segment one image (file or DICOM series folder) with ``saved``."""
    image, meta = read_image(Path(source))
    s = saved.settings
    spatial = image.ndim - 1
    if spatial < s.model.spatial_dims:
        raise UnsupportedFormatError(f"{Path(source).name} is {spatial}D; the model is "
                                     f"{s.model.spatial_dims}D")
    # a copy: normalise works in place, and the overlay draws on the image as read
    ready = normalise(np.array(select_channels(image, s.input_channels), np.float32))
    probabilities = predict(saved.model, ready, s, device, probabilities=True)
    return Segmentation(Path(source), image, meta, probabilities.argmax(axis=0).astype(np.uint8),
                        probabilities.astype(np.float32), s.structure_names)


# --------------------------------------------------------------------------- writers


# Overlay and SEG display colours of classes 1, 2, ... (RGB; cycled beyond ten);
# a one-structure model keeps its red overlay and a SEG without a colour.
PALETTE = ((230, 25, 75), (0, 130, 200), (60, 180, 75), (255, 225, 25), (145, 30, 180),
           (245, 130, 48), (70, 240, 240), (240, 50, 230), (210, 245, 60), (128, 128, 0))


def colour(class_index: int) -> tuple[int, int, int]:
    return PALETTE[(class_index - 1) % len(PALETTE)]


def check_label(saved: SavedModel, label: str | None) -> None:
    """``--label`` names the one segment of a one-structure model only."""
    names = saved.settings.structure_names
    if label is not None and len(names) > 1:
        raise ConfigError(f"--label names the one segment of a one-structure model; this "
                          f"model's segments take its structures' names ({', '.join(names)})")


def write_result(saved: SavedModel, result: Segmentation, out_dir: Path, *,
                 fractional: bool = False, label: str | None = None) -> list[Path]:
    """Write ``result`` in the form its source's viewers open; the paths.

    ``fractional``: a DICOM SEG holds each structure's probability instead of
    its mask. ``label``: the segment's label of a one-structure model
    (default: its structure's name, ``foreground`` when the run named none)."""
    check_label(saved, label)
    kind = file_kind(result.source)
    stem = _stem(result.source)
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "nifti":
        written = [write_nifti(result, out_dir / f"{stem}_seg.nii.gz")]
    elif kind == "pil":
        written = write_png(result, out_dir / f"{stem}_mask.png",
                            out_dir / f"{stem}_overlay.png")
    else:  # a DICOM series, or one (multi-frame) DICOM file: the SEG names its segments
        return [write_dicom_seg(saved, result, out_dir / f"{stem}_seg.dcm",
                                fractional=fractional, label=label)]
    if result.multiclass:
        written.append(write_label_names(saved, result, out_dir / f"{stem}_labels.json"))
    return written


def label_names(structures: tuple[str, ...]) -> dict[str, str]:
    """The label map of a result: ``{"0": "background", "1": <first structure>, ...}``
    (``dataset.json``'s ``labels`` form)."""
    return {"0": BACKGROUND, **{str(i + 1): n for i, n in enumerate(structures)}}


def write_label_names(saved: SavedModel, result: Segmentation, out: Path) -> Path:
    """What the values of a multi-structure label map (NIfTI, PNG) mean, beside it."""
    out.write_text(json.dumps({"labels": label_names(result.structures),
                               "model-sha256": saved.sha256}, indent=1) + "\n")
    return out


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp",
                   ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def write_nifti(result: Segmentation, out: Path) -> Path:
    """The label map on the source's own voxel grid and affine. A
    multi-structure one is marked a label map (NIfTI intent ``label``) and
    names its values in the header's description (80 characters at most:
    ``<stem>_labels.json`` beside it holds them all)."""
    import nibabel as nib

    src = nib.load(str(result.source))
    mask = result.mask
    if result.meta.transform is not None and mask.ndim == 3:
        mask = ornt.apply_orientation(mask, inverse(result.meta.transform))
    mask = mask.reshape(src.shape)  # the reader squeezed singleton axes: put them back
    img = nib.Nifti1Image(mask.astype(np.uint8), src.affine)
    img.header.set_xyzt_units(*src.header.get_xyzt_units())
    if result.multiclass:
        img.header.set_intent("label", (), name="fedseg")
        names = " ".join(f"{v}={n}" for v, n in label_names(result.structures).items()
                         if v != "0")
        img.header["descrip"] = f"fedseg labels {names}"[:80].encode()
    nib.save(img, str(out))
    return out


def write_png(result: Segmentation, mask_out: Path, overlay_out: Path) -> list[Path]:
    """The mask and the image with it drawn over it: for one structure a
    0/255 mask, drawn in red; for several a label map of class values (0, 1,
    2, ...), each class drawn in its colour (:data:`PALETTE`)."""
    from PIL import Image

    labels = result.mask.astype(np.uint8)
    Image.fromarray(labels if result.multiclass else labels * 255).save(mask_out)
    img = result.image
    rgb = np.repeat(img[:1], 3, axis=0) if img.shape[0] == 1 else img[:3]
    rgb = np.moveaxis(rgb, 0, -1).astype(np.float32)
    top = float(rgb.max()) or 1.0
    rgb = rgb / top * 255.0
    colours = np.zeros((1 + len(result.structures), 3), np.float32)
    for i in range(1, len(colours)):
        colours[i] = colour(i) if result.multiclass else (255, 0, 0)
    alpha = 0.45 * (labels > 0)[..., None]
    Image.fromarray((rgb * (1 - alpha) + colours[labels] * alpha).astype(np.uint8)
                    ).save(overlay_out)
    return [mask_out, overlay_out]


def write_dicom_seg(saved: SavedModel, result: Segmentation, out: Path, *,
                    fractional: bool = False, label: str | None = None) -> Path:
    """A DICOM SEG (highdicom) referencing the source series: same study and
    frame of reference, per-frame references to the source slices, one
    segment per structure (BINARY, or FRACTIONAL: the structure's probability)
    labelled with its name, of a generic coded category and type (SCT
    85756007 "Tissue": the run's names are free text), algorithm AUTOMATIC
    identified as fedseg with its version and the model's hash; new series
    and instance UIDs. A multi-structure SEG's segments also carry a
    description and a display colour (:data:`PALETTE`)."""
    import highdicom as hd
    import pydicom

    folder = result.source
    # one volume per segment: S x spatial
    if fractional:
        per_segment = result.probabilities[1:]
    else:
        per_segment = np.stack([result.mask == i + 1 for i in range(len(result.structures))])
    if folder.is_file():  # one DICOM file: a single frame, or frames last (the reader's)
        sources = [pydicom.dcmread(folder)]
        frames = np.stack([v[None] if v.ndim == 2 else np.moveaxis(v, -1, 0)
                           for v in per_segment], axis=-1)
        return _save_seg(hd, saved, result, sources, frames, fractional, label, out)
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

    def slices(values: np.ndarray) -> np.ndarray:
        if values.ndim == 3 and result.meta.transform is not None:
            # back from the reader's RAS grid to slices x rows x columns, source order
            values = ornt.apply_orientation(values, inverse(result.meta.transform))
            return np.transpose(values, (2, 1, 0))
        return values[None] if values.ndim == 2 else values

    frames = np.stack([slices(v) for v in per_segment], axis=-1)  # F x rows x cols x S
    return _save_seg(hd, saved, result, sources, frames, fractional, label, out)


def _save_seg(hd, saved: SavedModel, result: Segmentation, sources, frames: np.ndarray,
              fractional: bool, label: str | None, out: Path) -> Path:
    from pydicom.sr.codedict import codes

    names = result.structures
    many = len(names) > 1
    descriptions = []
    for i, name in enumerate(names, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=i, segment_label=(name if many else label or name)[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="fedseg", version=fedseg_version(),
                family=codes.cid7162.ArtificialIntelligence,
                parameters={"model-sha256": saved.sha256[:64]}),
            display_color=hd.color.CIELabColor.from_rgb(*colour(i)) if many else None)
        if many:
            description.SegmentDescription = (
                f"fedseg class {i} of {len(names)}: {name}"
                + (" (probability)" if fractional else ""))[:64]
        descriptions.append(description)
    shown = ", ".join(names) if many else label or names[0]
    with warnings.catch_warnings():  # highdicom's doubts about the source's own values
        warnings.simplefilter("ignore", UserWarning)
        try:
            seg = _segmentation(hd, sources, frames, fractional, descriptions, shown)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise UnsupportedFormatError(f"cannot write a DICOM SEG for this source: {exc}"
                                         ) from None
    if "FrameOfReferenceUID" not in seg:  # General Image then needs PatientOrientation
        seg.PatientOrientation = sources[0].get("PatientOrientation", "")
    seg.save_as(out)
    return out


def _segmentation(hd, sources, frames, fractional, descriptions, shown):
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames.astype(np.float32) if fractional else frames.astype(np.uint8),
        segmentation_type=(hd.seg.SegmentationTypeValues.FRACTIONAL if fractional
                           else hd.seg.SegmentationTypeValues.BINARY),
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=int(sources[0].get("SeriesNumber", 0)
                                                        or 0) + 1000,
        sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="fedseg", manufacturer_model_name="fedseg U-Net",
        software_versions=fedseg_version(), device_serial_number="none",
        series_description=f"fedseg {shown}"[:64], omit_empty_frames=False)
