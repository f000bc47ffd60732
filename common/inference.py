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

import copy
import hashlib
import io
import json
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from nibabel import orientations as ornt

from common.config import BACKGROUND, FOREGROUND, RunSettings
from common.data.harmonise import Harmonisation, dicom_modality, resize
from common.data.readers import ImageMeta, file_kind, read_image
from common.data.transforms import Preparation, prepare_image
from common.errors import ConfigError, DataError, UnsupportedFormatError
from common.model import build_model
from common.training import predict

CONFIG_FILES = ("model-card.json", "summary.json")  # beside a model: its run's settings
# what the scores are in, on model cards and reports (all but HD95 a fraction from 0 to 1)
SCORE_UNITS = {"dice": "fraction (0-1)", "iou": "fraction (0-1)", "hd95": "mm",
               "sensitivity": "fraction (0-1)", "specificity": "fraction (0-1)"}


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
    # the run's target spacing and intensity scheme (None: a run without one)
    harmonisation: Harmonisation | None = None

    def input_modality(self, source: Path) -> str:
        """The modality an input is taken as: its DICOM Modality, else the
        run's one modality where its harmonisation names one, else ``other``."""
        known = sorted(self.harmonisation.intensity) if self.harmonisation else []
        found = dicom_modality(source) if file_kind(Path(source)) in (
            "dicom", "dicom-series") else "other"
        if found == "other" and len(known) == 1:
            return known[0]
        return found


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
        # torch's own message suggests weights_only=False, which would run code
        # the file carries: not advice to pass on
        raise ConfigError(f"{path} is not a fedseg model (a PyTorch file of weights only; "
                          f"{type(exc).__name__} on loading it)") from None
    config = obj.get("config") if isinstance(obj, dict) and "state_dict" in obj else None
    state = obj["state_dict"] if config is not None else obj
    harmonised = obj.get("harmonisation") if config is not None else None
    if config is None:
        for name in CONFIG_FILES:
            side = path.with_name(name)
            if side.is_file():
                try:
                    beside = json.loads(side.read_text())
                except (OSError, ValueError) as exc:
                    raise ConfigError(f"{side} (the run settings beside the model) cannot be "
                                      f"read: {exc}") from None
                if not isinstance(beside, dict):
                    raise ConfigError(f"{side} (the run settings beside the model) is not a "
                                      f"JSON object")
                config, harmonised = beside.get("config"), beside.get("harmonisation")
                break
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise ConfigError(f"{path}: no run settings beside it (model-card.json or "
                          f"summary.json from its run folder): cannot rebuild the model")
    settings = RunSettings.from_run_config(config)
    model = build_model(settings.model)
    try:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    except (RuntimeError, TypeError, ValueError) as exc:  # a shape, or a value not a tensor
        raise ConfigError(f"{path} does not match the U-Net its settings describe: "
                          f"{str(exc).splitlines()[0]}") from None
    broken = [k for k, v in model.state_dict().items()
              if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:  # it would label every voxel background, and say nothing
        raise ConfigError(f"{path} holds NaN or infinite weights ({len(broken)} tensor(s), "
                          f"first {broken[0]}): a diverged or damaged model")
    harmonisation = Harmonisation.from_dict(harmonised) if harmonised else None
    return SavedModel(path, settings, model.eval(), hashlib.sha256(raw).hexdigest(),
                      harmonisation)


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
    notes: list[str] = field(default_factory=list)  # what a writer had to leave out or fill in

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
    if s.model.spatial_dims == 3 and meta.not_a_volume:
        raise UnsupportedFormatError(
            f"{meta.not_a_volume}; the model is 3D and reads one stack of evenly spaced "
            f"parallel slices: export the whole series, one plane a folder, or resample it")
    # as the run prepared its cases: resampled to its spacing, on its intensity scale
    prep = Preparation.of(s.input_channels, saved.harmonisation,
                          saved.input_modality(Path(source)))
    ready, resampled = prepare_image(image, meta.spacing, prep)
    probabilities = predict(saved.model, ready, s, device, probabilities=True)
    if resampled is not None:  # back onto the grid the image was read on
        probabilities = resize(probabilities, image.shape[1:])
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
        return write_dicom_seg(saved, result, out_dir / f"{stem}_seg.dcm",
                               fractional=fractional, label=label)
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
    # the source's own qform and sform, with their codes (scanner, aligned,
    # template...): a viewer reads the label map in the space it reads the image in
    qform, qcode = src.header.get_qform(coded=True)
    sform, scode = src.header.get_sform(coded=True)
    img.set_qform(qform if qcode else src.affine, code=int(qcode))
    img.set_sform(sform if scode else src.affine, code=int(scode))
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
    2, ...), each class drawn in its colour (:data:`PALETTE`). Below the
    overlay's image a legend names each structure beside its colour."""
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
    drawn = Image.fromarray((rgb * (1 - alpha) + colours[labels] * alpha).astype(np.uint8))
    _with_legend(drawn, [(name, tuple(int(c) for c in colours[i + 1]))
                         for i, name in enumerate(result.structures)]).save(overlay_out)
    return [mask_out, overlay_out]


def _with_legend(image, entries: list[tuple[str, tuple[int, int, int]]]):
    """``image`` above a white strip naming each structure beside its colour
    (the image's own pixels untouched: the strip is added below them)."""
    from PIL import Image, ImageDraw, ImageFont

    size = max(10, min(32, image.width // 40))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # a Pillow without scalable default fonts
        font = ImageFont.load_default()
    pad, box = max(2, size // 3), size
    probe = ImageDraw.Draw(image)
    widths = [box + pad + int(probe.textlength(name, font=font)) + 2 * pad
              for name, _ in entries]
    rows, x = [[]], pad
    for entry, width in zip(entries, widths, strict=True):
        if rows[-1] and x + width > image.width:
            rows.append([])
            x = pad
        rows[-1].append((entry, x))
        x += width
    line = box + pad
    out = Image.new("RGB", (image.width, image.height + pad + len(rows) * line), "white")
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    for k, row in enumerate(rows):
        y = image.height + pad + k * line
        for (name, rgb), x in row:
            draw.rectangle([x, y, x + box - 1, y + box - 1], fill=rgb, outline="black")
            draw.text((x + box + pad, y + box / 2), name, fill="black", font=font, anchor="lm")
    return out


def write_dicom_seg(saved: SavedModel, result: Segmentation, out: Path, *,
                    fractional: bool = False, label: str | None = None) -> list[Path]:
    """A DICOM SEG (highdicom) referencing the source series: same study and
    frame of reference, per-frame references to the source slices, one
    segment per structure (BINARY, or FRACTIONAL: the structure's probability)
    labelled with its name, of a generic coded category and type (SCT
    85756007 "Tissue": the run's names are free text), algorithm AUTOMATIC
    identified as fedseg with its version and the model's hash; new series
    and instance UIDs. A multi-structure SEG's segments also carry a
    description and a display colour (:data:`PALETTE`).

    Real archives' quirks are taken as they come (:func:`_source_view`): a
    series whose slices lie in several planes (a localizer) gets a SEG per
    plane (``<stem>_seg_1.dcm``, ...), and slices or frames that cannot be
    placed in patient space (no usable frame of reference, a multi-frame
    image without per-frame geometry) a SEG each, referencing its frame;
    what was left out or filled in is added to ``result.notes``."""
    import highdicom as hd

    from common.data.readers import _dcmread

    source = result.source
    # one volume per segment: S x spatial
    if fractional:
        per_segment = result.probabilities[1:]
    else:
        per_segment = np.stack([result.mask == i + 1 for i in range(len(result.structures))])
    if source.is_file():  # one DICOM file: a single frame, or a multi-frame image
        sources = [_dcmread(source)]
    else:
        by_uid = {}
        for f in sorted(p for p in source.rglob("*") if p.is_file()):
            try:
                ds = _dcmread(f)
            except DataError:  # not part of the series
                continue
            if "SOPInstanceUID" in ds:
                by_uid[str(ds.SOPInstanceUID).strip()] = ds
        uids = result.meta.source_uids
        missing = [u for u in uids if u not in by_uid]
        if missing:
            raise DataError(f"{source.name}: {len(missing)} source slice(s) could not be "
                            f"read back")
        sources = [by_uid[u] for u in uids]
    frames = np.stack([_as_stored(v, result.meta) for v in per_segment], axis=-1)
    units = _seg_units(sources, frames, source.name, result.notes)
    if len(units) == 1:
        paths = [out]
    else:
        stem = out.name[: -len(".dcm")] if out.name.endswith(".dcm") else out.name
        width = len(str(len(units)))
        paths = [out.with_name(f"{stem}_{k:0{width}d}.dcm") for k in range(1, len(units) + 1)]
    return [_save_seg(hd, saved, result, unit, fractional, label, path)
            for unit, path in zip(units, paths, strict=True)]


def _as_stored(values: np.ndarray, meta) -> np.ndarray:
    """A volume on the reader's grid back to its source's frames (``frames x rows
    x columns``): the slices of a series in position order (``meta.source_uids``'),
    the frames of a multi-frame image in stored order."""
    if values.ndim == 2:
        return values[None]
    if meta.transform is None:  # a multi-frame image without geometry: frames last
        return np.moveaxis(values, -1, 0)
    values = np.transpose(ornt.apply_orientation(values, inverse(meta.transform)), (2, 1, 0))
    if meta.frames is None:
        return values
    stored = np.empty_like(values)
    stored[np.asarray(meta.frames) - 1] = values
    return stored


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# Type 2 attributes a SEG copies from its source; a source without them gets them empty
TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
# what a single frame of a multi-frame image leaves behind (and its own geometry)
MULTI_FRAME_ONLY = ("NumberOfFrames", "FrameIncrementPointer", "GridFrameOffsetVector",
                    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
                    "FrameTime", "FrameTimeVector")
GEOMETRY = ("FrameOfReferenceUID", "PositionReferenceIndicator", "ImageOrientationPatient",
            "ImagePositionPatient", "SliceLocation")


@dataclass
class _SegUnit:
    """What one SEG is written from: its source datasets, their frames
    (F x rows x cols x S) and, for one frame of a multi-frame image, its number."""

    sources: list
    frames: np.ndarray
    frame_number: int | None = None
    placed: bool = True  # in the sources' frame of reference (else image by image)


def _orientation_key(ds) -> tuple | None:
    value = ds.get("ImageOrientationPatient")
    try:
        return tuple(round(float(v), 3) for v in value) if value else None
    except (TypeError, ValueError):
        return None


def _multi_frame(ds) -> bool:
    """Whether ``ds`` is a multi-frame image (by its frames or its IOD: an RT Dose
    of one frame is one)."""
    from highdicom._standard_utils import is_multiframe_image

    if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "SharedFunctionalGroupsSequence" in ds:
        return True
    try:
        return bool(is_multiframe_image(ds))
    except Exception:  # noqa: BLE001 - an unknown SOP class: as its frames say
        return False


def _placed(ds) -> bool:
    """Whether highdicom can place ``ds`` in patient space: a frame of
    reference of its own (not the study's UID again) and a plane geometry,
    in its header (single-frame) or its functional groups (enhanced multi-frame)."""
    for_uid = str(ds.get("FrameOfReferenceUID", "") or "").strip()
    if not for_uid or for_uid in {str(ds.get("StudyInstanceUID", "") or "").strip(),
                                  str(ds.get("SeriesInstanceUID", "") or "").strip(),
                                  str(ds.get("SOPInstanceUID", "") or "").strip()}:
        return False
    if _multi_frame(ds):
        per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
        return (_one_orientation(ds) is not None
                and len(per_frame) == int(ds.get("NumberOfFrames", 1) or 1)
                and all("PlanePositionSequence" in f for f in per_frame))
    return _orientation_key(ds) is not None and bool(ds.get("ImagePositionPatient"))


def _one_orientation(ds):
    """An enhanced image's plane orientation item: the shared one, or the one
    every frame repeats in its own group (as some scanners write it); None
    where the frames lie in different planes or say nothing."""
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    if shared is not None and shared.get("PlaneOrientationSequence"):
        return shared.PlaneOrientationSequence[0]
    items = [(f.get("PlaneOrientationSequence") or [None])[0]
             for f in ds.get("PerFrameFunctionalGroupsSequence") or []]
    if not items or any(i is None or "ImageOrientationPatient" not in i for i in items):
        return None
    keys = {_orientation_key(i) for i in items}
    return items[0] if len(keys) == 1 and None not in keys else None


def _seg_units(sources: list, frames: np.ndarray, name: str, notes: list[str]
               ) -> list[_SegUnit]:
    """The SEGs to write: one, unless the source's slices lie in several planes
    (one per plane) or cannot be placed in patient space (one per slice or frame)."""
    if len(sources) == 1 and _multi_frame(sources[0]):
        if _placed(sources[0]):
            return [_SegUnit(sources, frames)]
        notes.append(f"{name}: its frames cannot be placed in patient space (no usable "
                     f"frame of reference or per-frame geometry): a SEG per frame, each "
                     f"referencing its frame")
        return [_SegUnit(sources, frames[k: k + 1], k + 1, placed=False)
                for k in range(len(frames))]
    groups: dict[tuple | None, list[int]] = {}
    for k, ds in enumerate(sources):
        groups.setdefault(_orientation_key(ds), []).append(k)
    if len(groups) > 1:
        notes.append(f"{name}: its {len(sources)} slices lie in {len(groups)} planes (a "
                     f"localizer?): a SEG per plane")
    units = []
    for members in groups.values():
        group = [sources[k] for k in members]
        if all(_placed(ds) for ds in group):
            units.append(_SegUnit(group, frames[members]))
            continue
        if len(group) > 1:
            _note(notes, f"{name}: {len(group)} slices cannot be placed in patient space "
                         f"(no usable frame of reference): a SEG per slice")
        units.extend(_SegUnit([ds], frames[[k]], placed=False)
                     for ds, k in zip(group, members, strict=True))
    return units


def _note(notes: list[str], note: str) -> None:
    if note not in notes:
        notes.append(note)


def _character_set(sources: list):
    """The SEG's Specific Character Set: the source's where it is a valid one; an
    empty, missing, misspelt or retired one (text pydicom has already decoded)
    becomes the default repertoire for ASCII text, UTF-8 otherwise."""
    from highdicom.enum import SpecificCharacterSetValues

    ds = sources[0]
    raw = ds.get("SpecificCharacterSet")
    values = [] if raw is None else [str(v).strip() for v in (
        [raw] if isinstance(raw, (str, bytes)) else list(raw))]
    if len(values) > 1 and not values[0]:  # ISO 2022 code extensions: '' is the default
        values[0] = "ISO 2022 IR 6"
    known = {v.value for v in SpecificCharacterSetValues}
    if values and all(v in known for v in values):
        return values if len(values) > 1 else values[0]
    text = [str(ds.get(k, "") or "") for k in TYPE2_COPIED + ("StudyDescription",
                                                                "SeriesDescription")]
    return None if all(t.isascii() for t in text) else "ISO_IR 192"


def _source_view(ds, unit: _SegUnit, name: str, notes: list[str]):
    """A copy of a source dataset highdicom can build a SEG from, where the
    source itself is short of what highdicom asks: Type 2 attributes left out
    (empty instead), no study or series UID (new ones: noted), a frame of
    reference that cannot place it (left out, and the SOP class shown as
    Secondary Capture while the SEG is built, :func:`_restore_references`
    puts the real one back), one frame of a multi-frame image (that frame alone)."""
    from highdicom import UID
    from highdicom._standard_utils import ModuleUsageValues, get_module_usage

    view = ds.copy()  # shallow: its elements are the source's own until deep-copied
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in view:  # highdicom reads no source pixel: not copied
            delattr(view, keyword)
    view = copy.deepcopy(view)
    if "SOPInstanceUID" not in ds or not str(ds.SOPInstanceUID).strip():
        raise UnsupportedFormatError(f"{name} has no SOPInstanceUID: a DICOM SEG cannot "
                                     f"reference it")
    for keyword in TYPE2_COPIED:
        if keyword not in view:
            setattr(view, keyword, None)
    for keyword, what in (("StudyInstanceUID", "study"), ("SeriesInstanceUID", "series")):
        if not str(view.get(keyword, "") or "").strip():
            setattr(view, keyword, UID())
            _note(notes, f"{name} has no {keyword}: the SEG is given a new {what} UID, so a "
                         f"viewer shows it apart from its image")
    for keyword, vr in (("StudyDate", "DA"), ("StudyTime", "TM"),
                        ("PatientBirthDate", "DA")):
        if keyword in view:
            setattr(view, keyword, _conformant(view[keyword].value, vr))
    if str(view.get("PatientIdentityRemoved", "")).upper() == "YES" and not (
            "DeidentificationMethod" in view or "DeidentificationMethodCodeSequence" in view):
        view.DeidentificationMethod = "not recorded in the source image"  # Type 1C then
    if not str(view.get("Modality", "") or "").strip():
        view.Modality = "OT"  # read by highdicom, not written: the SEG's is SEG
    if not unit.placed:
        if "FrameOfReferenceUID" in ds and not unit.frame_number:
            _note(notes, f"{name}: its FrameOfReferenceUID cannot place it (it repeats "
                         f"another UID, or the image has no plane geometry): the SEG "
                         f"references the image frame by frame, without one")
        for keyword in GEOMETRY + (MULTI_FRAME_ONLY if unit.frame_number else ()):
            if keyword in view:
                delattr(view, keyword)
        sop_class = str(ds.get("SOPClassUID", ""))
        if unit.frame_number or get_module_usage(
                "frame-of-reference", sop_class) == ModuleUsageValues.MANDATORY:
            view.SOPClassUID = SECONDARY_CAPTURE
    elif "FrameOfReferenceUID" in ds and not (
            _orientation_key(ds) or "SharedFunctionalGroupsSequence" in ds):
        delattr(view, "FrameOfReferenceUID")
    elif _multi_frame(ds) and (orientation := _one_orientation(ds)) is not None:
        if not view.get("SharedFunctionalGroupsSequence"):
            from pydicom.dataset import Dataset

            view.SharedFunctionalGroupsSequence = [Dataset()]
        shared = view.SharedFunctionalGroupsSequence[0]
        if not shared.get("PlaneOrientationSequence"):  # each frame repeats it: share it
            shared.PlaneOrientationSequence = [copy.deepcopy(orientation)]
            for item in view.get("PerFrameFunctionalGroupsSequence") or []:
                if "PlaneOrientationSequence" in item:
                    del item.PlaneOrientationSequence
    return view


def _conformant(value, vr: str):
    """A date or time in today's form: the retired ACR-NEMA forms (``1993.04.27``,
    ``14:04:38``) without their dots and colons; None (empty) where it is no date
    or time at all."""
    import re

    text = str(value or "").strip().replace(".", "" if vr == "DA" else ".")
    if vr == "TM" and ":" in text:
        head, _, frac = text.partition(".")
        text = head.replace(":", "") + (f".{frac}" if frac else "")
    pattern = r"\d{8}" if vr == "DA" else r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?"
    return text if re.fullmatch(pattern, text) else None


def _restore_references(seg, sources: list, frame_number: int | None) -> None:
    """Put the sources' real SOP classes (and, for one frame of a multi-frame
    image, its frame number) in every reference the SEG makes to them."""
    classes = {str(ds.SOPInstanceUID).strip(): str(ds.SOPClassUID) for ds in sources}

    def walk(dataset) -> None:
        for elem in dataset:
            if elem.VR != "SQ":
                continue
            for item in elem.value:
                uid = str(item.get("ReferencedSOPInstanceUID", "")).strip()
                if uid in classes:
                    item.ReferencedSOPClassUID = classes[uid]
                    if frame_number and elem.keyword != "ReferencedInstanceSequence":
                        item.ReferencedFrameNumber = frame_number
                walk(item)

    walk(seg)


def _save_seg(hd, saved: SavedModel, result: Segmentation, unit: _SegUnit,
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
    name = result.source.name
    notes = result.notes
    with warnings.catch_warnings():  # highdicom's doubts about the source's own values
        warnings.simplefilter("ignore", UserWarning)
        try:
            views = [_source_view(ds, unit, name, notes) for ds in unit.sources]
            seg = _segmentation(hd, views, unit.frames, fractional, descriptions, shown,
                                _character_set(unit.sources))
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise UnsupportedFormatError(f"cannot write a DICOM SEG for {name}: {exc}"
                                         ) from None
    _restore_references(seg, unit.sources, unit.frame_number)
    if "FrameOfReferenceUID" not in seg:  # General Image then needs PatientOrientation
        seg.PatientOrientation = unit.sources[0].get("PatientOrientation", "")
    seg.save_as(out)
    return out


def _segmentation(hd, sources, frames, fractional, descriptions, shown, character_set):
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
        series_description=f"fedseg {shown}"[:64], omit_empty_frames=False,
        specific_character_set=character_set)
