"""From loaded cases to network inputs, with MONAI's transforms.

Every image is brought to the run's scale (``common.data.harmonise``): resampled
to the federation's target spacing, then CT clipped and normalised with the
federation's foreground statistics, other images z-scored on their own (per
channel, over the whole case), so scanners with different voxel sizes and
intensity scales meet the network alike.
A 2D network sees 3D cases as their axial slices; a 3D network sees volumes.
Training draws random patches, half of them centred on foreground to offset
the class imbalance of small structures; inference runs a sliding window at
full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from monai.transforms import (
    Compose,
    NormalizeIntensity,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from common.data.harmonise import Harmonisation, Intensity, resize, scale_intensity, target_shape
from common.data.site import Case

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
CHANNEL = {"red": 0, "green": 1, "blue": 2}


def select_channels(image: np.ndarray, mode: str) -> np.ndarray:
    """``C x spatial`` to the channels the model takes (``grey``: 1, ``rgb``: 3,
    ``red``/``green``/``blue``: that one channel of a colour image)."""
    c = image.shape[0]
    if mode == "rgb":
        return image if c == 3 else np.repeat(image[:1], 3, axis=0)
    if c == 1:
        return image
    if mode == "grey":
        return np.tensordot(LUMA, image[:3], axes=1)[None].astype(np.float32)
    return image[CHANNEL[mode] : CHANNEL[mode] + 1]


def normalise(image: np.ndarray) -> np.ndarray:
    """Z-score per channel over the whole case."""
    return np.asarray(NormalizeIntensity(channel_wise=True)(image), dtype=np.float32)


@dataclass(frozen=True)
class Preparation:
    """How a site's cases become model inputs: the channels the model takes,
    the run's target spacing (None: as read) and its intensity scheme for the
    site's modality (``common.data.harmonise``)."""

    channels: str
    spacing: tuple[float, ...] | None = None
    intensity: Intensity = field(default_factory=Intensity)

    @classmethod
    def of(cls, channels: str, harmonisation: Harmonisation | None, modality: str
           ) -> Preparation:
        if harmonisation is None:
            return cls(channels)
        return cls(channels, harmonisation.spacing, harmonisation.for_modality(modality))


def prepare_image(image: np.ndarray, spacing: tuple[float, ...], prep: Preparation
                  ) -> tuple[np.ndarray, tuple[int, ...] | None]:
    """An image (C x spatial as read) as the model takes it, and the shape it
    was resampled to (None: not resampled)."""
    image = select_channels(image, prep.channels)
    shape = None
    if prep.spacing is not None:
        shape = target_shape(image.shape[1:], spacing, prep.spacing)
        if shape is not None:
            image = resize(np.asarray(image, np.float32), shape)
    return scale_intensity(np.array(image, np.float32), prep.intensity), shape


def prepare_case(case: Case, prep: Preparation | str, keep_source: bool = False) -> Case:
    """``case`` model-ready: channels selected, resampled to the target
    spacing (the label by nearest neighbour), intensities scaled. A case
    already prepared the same way is returned as it is. ``keep_source``: a
    resampled case keeps its label and spacing as read (``Case.source``), to
    be scored on that grid."""
    if isinstance(prep, str):
        if case.prepared is not None and case.prepared.channels == prep:
            return case
        prep = Preparation(prep)
    if case.prepared is not None:
        if case.prepared == prep:
            return case
        done = case.prepared
        what = (f"input-channels {done.channels!r}, not {prep.channels!r}"
                if done.channels != prep.channels else
                f"spacing {done.spacing} and {done.intensity}, not {prep.spacing} and "
                f"{prep.intensity}")
        raise ValueError(f"case {case.case_id!r} was prepared for {what}")
    image, shape = prepare_image(case.image, case.spacing, prep)
    label, spacing = case.label, case.spacing
    if shape is not None:
        label = resize(case.label, shape, labels=True)
        spacing = tuple(float(v) for v in prep.spacing)
    source = (case.label, case.spacing) if keep_source and shape is not None else None
    return Case(case.case_id, image, label, spacing, prepared=prep, source=source)


def prepare(case: Case, prep: Preparation | str) -> tuple[np.ndarray, np.ndarray]:
    """A case's model-ready ``(image, label)`` (:func:`prepare_case`)."""
    ready = prepare_case(case, prep)
    return ready.image, ready.label


def prepared(cases: list[Case], prep: Preparation | str, keep_source: bool = False
             ) -> list[Case]:
    """The cases model-ready (:func:`prepare_case`), so repeated training and
    scoring skip the work (and the raw images can be let go)."""
    return [prepare_case(c, prep, keep_source) for c in cases]


def training_items(
    cases: list[Case], spatial_dims: int, channels: Preparation | str
) -> list[dict[str, np.ndarray]]:
    """``{"image", "label"}`` items: whole 2D images, or 2D slices of 3D cases
    for a 2D network, or whole volumes for a 3D network. A case kept on disk
    (``common.data.store.StoredCase``) gives ``{"stored": case, "slice": k}``
    instead, opened by :class:`OpenStored` (the first step of
    :func:`training_transform`) only while its patches are drawn."""
    items: list[dict] = []
    for case in cases:
        if hasattr(case, "training_item"):  # on disk: opened when drawn from
            prepare_case(case, channels)  # checks it was prepared as asked
            if case.spatial_dims == spatial_dims:
                items.append({"stored": case, "slice": None})
                continue
            if case.spatial_dims == 3 and spatial_dims == 2:
                items.extend({"stored": case, "slice": k} for k in range(case.depth))
                continue
        image, label = prepare(case, channels)
        if case.spatial_dims == spatial_dims:
            items.append({"image": image, "label": label})
        elif case.spatial_dims == 3 and spatial_dims == 2:
            items.extend(
                {"image": image[..., k], "label": label[..., k]} for k in range(image.shape[-1])
            )
        else:
            raise ValueError(
                f"a {spatial_dims}D model cannot train on {case.spatial_dims}D case "
                f"{case.case_id!r}"
            )
    return items


# The spatial axes training mirrors along, for 2D and 3D alike: the first two
# (in-plane: right-left and anterior-posterior of a RAS volume; the 90-degree
# rotations turn that plane too). Test-time flips mirror along these and no
# other: a model never shown a volume upside down labels one badly (a 3D
# hippocampus model scored Dice 0.86 plain, 0.45 averaged over flips along all
# three axes when it had been trained on two, issue 27).
MIRROR_AXES = (0, 1)


class OpenStored:
    """An item of a case kept on disk (``{"stored": case, "slice": k}``) as
    ``{"image", "label"}`` views of its memory-mapped files (and, for a
    whole case, pickers of its foreground and background voxels for the
    crop, ``common.data.store.VoxelPicker``); any other item as it is. The
    views live as long as the item's patches are drawn from them; the crop
    copies only the patches (MONAI takes a C-order mapped array as a tensor
    without copying it)."""

    def __init__(self, patch: tuple[int, ...]) -> None:
        self.patch = patch

    def __call__(self, item: dict) -> dict:
        case = item.get("stored")
        if case is None:
            return item
        return case.training_item(item["slice"], self.patch)


def mirror_transforms(keys: tuple[str, ...]) -> list:
    """One of the 8 symmetries of the square in the plane of ``MIRROR_AXES``,
    each with probability 1/8: a turn by 0, 90, 180 or 270 degrees (1/4 each;
    MONAI's ``RandRotate90d`` draws 1 to ``max_k`` quarter turns when it
    applies), then a mirror along the first axis or not (1/2). The same
    symmetries as a mirror along each axis and then a turn, in two
    transforms instead of three (a patch's augmentation is a fifth of a 3D
    CPU step, docs/performance.md)."""
    return [RandRotate90d(keys, prob=0.75, max_k=3, spatial_axes=MIRROR_AXES),
            RandFlipd(keys, prob=0.5, spatial_axis=MIRROR_AXES[0])]


def training_transform(patch_size: int, spatial_dims: int, samples: int) -> Compose:
    """Pad to the patch, draw ``samples`` patches (half on foreground), augment:
    one of the symmetries of the square in the plane of ``MIRROR_AXES``
    (:func:`mirror_transforms`), scale and shift intensities. Items of cases
    on disk are opened first (:class:`OpenStored`)."""
    patch = (patch_size,) * spatial_dims
    keys = ("image", "label")
    return Compose(
        [
            OpenStored(patch),
            SpatialPadd(keys, spatial_size=patch),
            RandCropByPosNegLabeld(
                keys, label_key="label", spatial_size=patch, pos=1, neg=1,
                num_samples=samples, allow_smaller=True,
                fg_indices_key="fg", bg_indices_key="bg",
            ),
            *mirror_transforms(keys),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    )
