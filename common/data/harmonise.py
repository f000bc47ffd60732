"""Scanners harmonised across sites: a federated fingerprint, and what a run
fixes from it.

Hospitals' scanners differ in voxel size (0.6-1 mm in-plane, 0.6-5 mm between
slices) and, for MR, in intensity scale. nnU-Net (Isensee et al., Nature
Methods 2021) fixes both from a *dataset fingerprint*: every case is
resampled to the median voxel spacing of the dataset, axis by axis (where the
dataset is anisotropic, the coarsest axis more than three times the finest,
that axis takes the 10th percentile of its spacings instead); CT intensities
are clipped to the 0.5 and 99.5 percentiles of the foreground voxels and
normalised with their mean and standard deviation, so Hounsfield units keep
their meaning across sites; other modalities are z-scored case by case.

Pooled data is not to be had in a federation. As in federated nnU-Net work
(FednnU-Net; Kaapana's federated nnU-Net), each site reports aggregates of its
own training cases instead (:class:`SiteFingerprint`: case count, spacing and
size quantiles, foreground intensity percentiles, mean and deviation, its
modality; nothing of any one case), and the server combines them
(:func:`combine`):

* target spacing: per axis, the case-weighted median of the sites' median
  spacings (the coarse axis of an anisotropic federation: of their 10th
  percentiles);
* CT: clip bounds the foreground-voxel-weighted means of the sites' 0.5 and
  99.5 percentiles; mean and deviation of all sites' foreground voxels,
  exactly (from each site's count, mean and deviation);
* MR and others: per-case z-score, as before.

The result, a :class:`Harmonisation`, goes to every site with each round's
instructions, is recorded in the run's ``summary.json``, model cards and
report, and travels with the model: ``fedseg predict`` resamples each input to
the target spacing and its result back onto the input's own grid.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError, DataError

MODALITIES = ("CT", "MR", "other")
SPACING_QUANTILES = (10, 50, 90)
CLIP_PERCENTILES = (0.5, 99.5)  # nnU-Net's, of the foreground voxels
SAMPLES_PER_CASE = 10_000  # foreground voxels sampled per case for the percentiles
ANISOTROPY = 3.0  # coarsest / finest median spacing beyond which the coarse axis differs
SAME_SPACING = 0.01  # relative difference below which a case is not resampled
MAX_SPACING_MM = 100.0
MAX_GROWTH = 27  # a resampled case holds at most this many times its voxels as read

_MR_NAMES = {"MR", "MRI", "T1", "T1W", "T2", "T2W", "FLAIR", "ADC", "DWI", "PD", "T1C", "T1CE",
             "T1GD", "SWI", "MP-RAGE", "MPRAGE"}


def modality_of(name: object) -> str:
    """``CT``, ``MR`` or ``other`` for a modality name as datasets write it
    (MSD's ``modality``: ``"CT"``, ``"MRI"``, ``"T2"``...; DICOM's (0008,0060))."""
    text = str(name or "").strip().upper().replace(" ", "")
    if text in ("CT", "CTA", "CBCT", "PET/CT"):
        return "CT"
    if text in _MR_NAMES or text.startswith("MR"):
        return "MR"
    return "other"


def site_modality(site_dir: Path, first_image: Path | None = None) -> str:
    """A site's modality: ``dataset.json``'s ``modality`` (MSD) or
    ``channel_names`` (nnU-Net v2) of channel 0, else the DICOM Modality of
    its first image, else ``other``."""
    spec_path = Path(site_dir) / "dataset.json"
    if spec_path.is_file():
        try:
            spec = json.loads(spec_path.read_text())
        except (OSError, ValueError):
            spec = {}
        for key in ("modality", "channel_names"):
            value = spec.get(key) if isinstance(spec, dict) else None
            if isinstance(value, Mapping) and value:
                return modality_of(value.get("0", next(iter(value.values()))))
            if isinstance(value, str):
                return modality_of(value)
    return dicom_modality(first_image) if first_image is not None else "other"


def dicom_modality(image: Path) -> str:
    """The Modality (0008,0060) of a DICOM file or series folder, as
    :func:`modality_of` names it; ``other`` where there is none to read."""
    import pydicom

    path = Path(image)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
    else:
        files = [path] if path.is_file() else []
    for f in files[:3]:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["Modality"])
        except Exception:  # noqa: BLE001 - not DICOM, or damaged: no modality from it
            continue
        if "Modality" in ds:
            return modality_of(ds.Modality)
    return "other"


@dataclass(frozen=True)
class SiteFingerprint:
    """What one site reports of its training cases: aggregates only.

    ``spacing``/``size``: per quantile of :data:`SPACING_QUANTILES`, one value
    per axis (mm; voxels). ``fg_*``: over the foreground (labelled) voxels of
    the first input channel: their count, mean and standard deviation, and
    the :data:`CLIP_PERCENTILES` of up to :data:`SAMPLES_PER_CASE` voxels a case."""

    cases: int
    modality: str
    spacing: tuple[tuple[float, ...], ...]
    size: tuple[tuple[float, ...], ...]
    fg_voxels: int
    fg_mean: float
    fg_std: float
    fg_low: float
    fg_high: float

    def to_metrics(self) -> dict[str, Any]:
        """The reply's metric record (numbers and lists of numbers only)."""
        out: dict[str, Any] = {"cases": int(self.cases), "fg-voxels": int(self.fg_voxels),
                               "fg-mean": float(self.fg_mean), "fg-std": float(self.fg_std),
                               "fg-low": float(self.fg_low), "fg-high": float(self.fg_high)}
        for q, spacing, size in zip(SPACING_QUANTILES, self.spacing, self.size, strict=True):
            out[f"spacing-p{q}"] = [float(v) for v in spacing]
            out[f"size-p{q}"] = [float(v) for v in size]
        return out

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any], modality: str) -> SiteFingerprint:
        """A site's reply read back, every value checked (a broken or hostile
        reply is refused naming the key, never used)."""
        def number(key: str, low: float = -math.inf, high: float = math.inf) -> float:
            value = metrics.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or not low <= value <= high:
                raise DataError(f"fingerprint '{key}' must be a finite number from {low} to "
                                f"{high}")
            return float(value)

        def vector(key: str, low: float, high: float) -> tuple[float, ...]:
            value = metrics.get(key)
            if not isinstance(value, list | tuple) or not 2 <= len(value) <= 3 or any(
                    isinstance(v, bool) or not isinstance(v, int | float)
                    or not math.isfinite(v) or not low <= v <= high for v in value):
                raise DataError(f"fingerprint '{key}' must be 2 or 3 numbers from {low} to "
                                f"{high}")
            return tuple(float(v) for v in value)

        if modality not in MODALITIES:
            raise DataError(f"fingerprint modality must be one of {', '.join(MODALITIES)}")
        spacing = tuple(vector(f"spacing-p{q}", 1e-3, 1e3) for q in SPACING_QUANTILES)
        size = tuple(vector(f"size-p{q}", 1, 1e5) for q in SPACING_QUANTILES)
        if len({len(v) for v in (*spacing, *size)}) != 1:
            raise DataError("fingerprint spacings and sizes must have one length")
        return cls(cases=int(number("cases", 1, 1e7)), modality=modality,
                   spacing=spacing, size=size,
                   fg_voxels=int(number("fg-voxels", 0, 1e15)),
                   fg_mean=number("fg-mean"), fg_std=number("fg-std", 0),
                   fg_low=number("fg-low"), fg_high=number("fg-high"))


class FingerprintAccumulator:
    """Takes a site's training cases one at a time (:meth:`add`) and keeps only
    sums and a bounded sample of each case's foreground; :meth:`result` is
    the site's :class:`SiteFingerprint`."""

    def __init__(self, modality: str, seed: int = 0) -> None:
        self.modality = modality
        self.rng = np.random.default_rng(seed)
        self.spacings: list[list[float]] = []
        self.sizes: list[list[int]] = []
        self.samples: list[np.ndarray] = []
        self.count, self.total, self.squares = 0, 0.0, 0.0

    def add(self, image: np.ndarray, label: np.ndarray, spacing: Sequence[float]) -> None:
        """One case: ``image`` C x spatial (its first channel counts), ``label``
        1 x spatial (non-zero: labelled), ``spacing`` mm per spatial axis."""
        self.spacings.append([float(s) for s in spacing])
        self.sizes.append(list(image.shape[1:]))
        fg = np.asarray(image[0], dtype=np.float64)[np.asarray(label[0]) > 0]
        if fg.size:
            self.count += fg.size
            self.total += float(fg.sum())
            self.squares += float(np.square(fg).sum())
            self.samples.append(fg if fg.size <= SAMPLES_PER_CASE else
                                self.rng.choice(fg, SAMPLES_PER_CASE, replace=False))

    def result(self) -> SiteFingerprint:
        if not self.spacings:
            raise DataError("no training case to take a fingerprint of")
        if len({len(s) for s in self.spacings}) != 1:
            raise DataError("the site's training cases mix 2D and 3D images")
        n = self.count
        mean = self.total / n if n else 0.0
        std = math.sqrt(max(self.squares / n - mean * mean, 0.0)) if n else 0.0
        pooled = np.concatenate(self.samples) if self.samples else np.zeros(1)
        low, high = (float(v) for v in np.percentile(pooled, CLIP_PERCENTILES))
        spacing_q = np.percentile(np.asarray(self.spacings), SPACING_QUANTILES, axis=0)
        size_q = np.percentile(np.asarray(self.sizes, dtype=np.float64), SPACING_QUANTILES,
                               axis=0)
        return SiteFingerprint(
            cases=len(self.spacings), modality=self.modality,
            spacing=tuple(tuple(round(float(v), 6) for v in row) for row in spacing_q),
            size=tuple(tuple(round(float(v), 2) for v in row) for row in size_q),
            fg_voxels=n, fg_mean=mean, fg_std=std, fg_low=low, fg_high=high)


def site_fingerprint(cases: Iterable[tuple[np.ndarray, np.ndarray, Sequence[float]]],
                     modality: str, seed: int = 0) -> SiteFingerprint:
    """The fingerprint of ``cases``: ``(image C x spatial, label 1 x spatial,
    spacing)`` each, taken one at a time."""
    acc = FingerprintAccumulator(modality, seed)
    for image, label, spacing in cases:
        acc.add(image, label, spacing)
    return acc.result()


@dataclass(frozen=True)
class Intensity:
    """How one modality's intensities are brought to one scale: ``zscore``
    (each case on its own) or ``ct`` (clip to ``clip``, then ``(x - mean) / std``)."""

    scheme: str = "zscore"
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None


@dataclass(frozen=True)
class Harmonisation:
    """What a run fixed from its sites' fingerprints; the same at every site.

    ``spacing``: the target voxel spacing (mm per array axis), or None (cases
    as read). ``intensity``: by modality; a modality not listed is z-scored."""

    spacing: tuple[float, ...] | None = None
    intensity: dict[str, Intensity] = field(default_factory=dict)
    sites: int = 0  # how many sites' fingerprints it came from (0: fixed by settings)

    def for_modality(self, modality: str) -> Intensity:
        return self.intensity.get(modality, Intensity())

    def to_dict(self) -> dict[str, Any]:
        return {"spacing": list(self.spacing) if self.spacing else None,
                "intensity": {m: {k: (list(v) if isinstance(v, tuple) else v)
                                  for k, v in asdict(i).items()}
                              for m, i in sorted(self.intensity.items())},
                "sites": self.sites}

    def to_wire(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> Harmonisation:
        """Read back (from the wire, a run folder or a model card), every
        value checked; a ConfigError names what is wrong."""
        if not isinstance(data, Mapping) or set(data) - {"spacing", "intensity", "sites"}:
            raise ConfigError("harmonisation must be an object of spacing, intensity, sites")
        spacing = data.get("spacing")
        if spacing is not None:
            if not isinstance(spacing, list | tuple) or not 2 <= len(spacing) <= 3 or any(
                    isinstance(v, bool) or not isinstance(v, int | float)
                    or not math.isfinite(v) or not 1e-3 <= v <= MAX_SPACING_MM
                    for v in spacing):
                raise ConfigError(f"harmonisation spacing must be 2 or 3 numbers of mm from "
                                  f"0.001 to {MAX_SPACING_MM:g}")
            spacing = tuple(float(v) for v in spacing)
        intensity = {}
        raw = data.get("intensity") or {}
        if not isinstance(raw, Mapping):
            raise ConfigError("harmonisation intensity must be an object by modality")
        for modality, spec in raw.items():
            if modality not in MODALITIES or not isinstance(spec, Mapping):
                raise ConfigError(f"harmonisation intensity: unknown modality "
                                  f"{str(modality)[:20]!r} (one of {', '.join(MODALITIES)})")
            scheme = spec.get("scheme")
            if scheme == "zscore":
                intensity[modality] = Intensity()
                continue
            if scheme != "ct":
                raise ConfigError(f"harmonisation intensity of {modality}: scheme must be "
                                  f"zscore or ct")
            clip, mean, std = spec.get("clip"), spec.get("mean"), spec.get("std")
            numbers = [*(clip if isinstance(clip, list | tuple) else [None]), mean, std]
            if not isinstance(clip, list | tuple) or len(clip) != 2 or any(
                    isinstance(v, bool) or not isinstance(v, int | float)
                    or not math.isfinite(v) for v in numbers) or clip[0] > clip[1] \
                    or not std > 0:
                raise ConfigError(f"harmonisation intensity of {modality}: ct needs clip "
                                  f"[low, high], mean and a positive std, all finite")
            intensity[modality] = Intensity("ct", (float(clip[0]), float(clip[1])),
                                            float(mean), float(std))
        sites = data.get("sites", 0)
        if isinstance(sites, bool) or not isinstance(sites, int) or not 0 <= sites <= 10**6:
            raise ConfigError("harmonisation sites must be a whole number")
        return cls(spacing, intensity, sites)

    @classmethod
    def from_wire(cls, text: Any) -> Harmonisation:
        if not isinstance(text, str) or len(text) > 4096:
            raise ConfigError("harmonisation must be a JSON text of at most 4096 characters")
        try:
            data = json.loads(text)
        except ValueError:
            raise ConfigError("harmonisation is not valid JSON") from None
        return cls.from_dict(data)

    def describe(self) -> str:
        """One line for logs and reports."""
        spacing = ("cases as read" if not self.spacing else
                   "target spacing " + " x ".join(f"{v:.3g}" for v in self.spacing) + " mm")
        parts = [spacing]
        for modality, i in sorted(self.intensity.items()):
            if i.scheme == "ct":
                parts.append(f"{modality}: clip {i.clip[0]:.1f}..{i.clip[1]:.1f}, "
                             f"mean {i.mean:.1f}, std {i.std:.1f}")
            else:
                parts.append(f"{modality}: per-case z-score")
        return "; ".join(parts)


def _weighted_median(values: Sequence[float], weights: Sequence[float]) -> float:
    order = np.argsort(values)
    v, w = np.asarray(values, float)[order], np.asarray(weights, float)[order]
    cum = np.cumsum(w)
    return float(v[np.searchsorted(cum, cum[-1] / 2)])


def parse_spacing(text: str) -> tuple[float, ...] | None:
    """The ``target-spacing`` setting: empty (from the fingerprint) or 2-3 mm values."""
    if not text.strip():
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"setting 'target-spacing' must be 2 or 3 comma-separated mm "
                          f"values, e.g. '1,1,3', got {text!r}") from None
    if not 2 <= len(values) <= 3 or not all(1e-3 <= v <= MAX_SPACING_MM for v in values):
        raise ConfigError(f"setting 'target-spacing' must be 2 or 3 mm values from 0.001 to "
                          f"{MAX_SPACING_MM:g}, got {text!r}")
    return values


def combine(fingerprints: Mapping[str, SiteFingerprint], mode: str = "auto",
            spacing: tuple[float, ...] | None = None,
            each_site_once: bool = False) -> Harmonisation:
    """The run's harmonisation from its sites' fingerprints (by site name).
    ``mode``: the run's ``harmonise`` (``auto``: spacing and intensity;
    ``intensity``: intensity only; ``off``: nothing). ``spacing``: the
    ``target-spacing`` setting, which replaces the fingerprint's.

    By default a site weighs by the cases (spacing) and foreground voxels (CT
    statistics) it reports, so one site that overstates them sets the
    spacing and the CT scale. ``each_site_once`` (the run's ``aggregation``
    is a robust rule): every site counts once, and the target spacing and CT
    statistics are medians over the sites, which fewer than half of them
    cannot move past the honest sites' values, whatever they report."""
    if mode == "off":
        return Harmonisation()
    prints = list(fingerprints.values())
    target = spacing
    if mode == "auto" and target is None and prints:
        dims = {len(p.spacing[0]) for p in prints}
        if len(dims) != 1:
            raise DataError("the sites' cases are not all of one dimension (2D and 3D mixed): "
                            "set target-spacing or harmonise = intensity")
        weights = [1 if each_site_once else p.cases for p in prints]
        median = [_weighted_median([p.spacing[1][a] for p in prints], weights)
                  for a in range(dims.pop())]
        if max(median) / min(median) > ANISOTROPY:  # nnU-Net's rule for the coarse axis
            coarse = int(np.argmax(median))
            median[coarse] = _weighted_median([p.spacing[0][coarse] for p in prints], weights)
        target = tuple(round(v, 6) for v in median)
    if mode == "intensity":
        target = None
    intensity: dict[str, Intensity] = {}
    for modality in sorted({p.modality for p in prints}):
        group = [p for p in prints if p.modality == modality and p.fg_voxels > 0]
        if modality != "CT" or not group:
            intensity[modality] = Intensity()
            continue
        if each_site_once:  # the median site's, statistic by statistic
            mean, std, low, high = (float(np.median([getattr(p, k) for p in group]))
                                    for k in ("fg_mean", "fg_std", "fg_low", "fg_high"))
            std = std or 1.0
        else:  # the pooled voxels' (exact from the sites' counts, means and stds)
            n = sum(p.fg_voxels for p in group)
            mean = sum(p.fg_voxels * p.fg_mean for p in group) / n
            second = sum(p.fg_voxels * (p.fg_std ** 2 + p.fg_mean ** 2) for p in group) / n
            std = math.sqrt(max(second - mean * mean, 0.0)) or 1.0
            low = sum(p.fg_voxels * p.fg_low for p in group) / n
            high = sum(p.fg_voxels * p.fg_high for p in group) / n
        intensity[modality] = Intensity("ct", (round(low, 4), round(high, 4)),
                                        round(mean, 4), round(std, 4))
    return Harmonisation(target, intensity, len(prints))


# --------------------------------------------------------------------- applying it


def target_shape(shape: Sequence[int], spacing: Sequence[float],
                 target: Sequence[float]) -> tuple[int, ...] | None:
    """The spatial shape of a case of ``shape`` at ``spacing`` resampled to
    ``target``; None where it need not be resampled (every axis within 1%)."""
    if len(spacing) != len(target):
        raise DataError(f"a case of {len(spacing)} axes cannot take a target spacing of "
                        f"{len(target)}")
    if all(abs(s / t - 1) < SAME_SPACING for s, t in zip(spacing, target, strict=True)):
        return None
    out = tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target,
                                                            strict=True))
    # The spacing comes from the server: one far finer than the case's would
    # make it many times its size in the site's memory. Refused, not resampled.
    if math.prod(out) > MAX_GROWTH * max(1, math.prod(shape)):
        raise DataError(f"the run's target spacing {tuple(target)} mm would make this case "
                        f"{math.prod(out) / max(1, math.prod(shape)):.0f} times its voxels "
                        f"(at most {MAX_GROWTH}): refused")
    return out


def resize(array: np.ndarray, shape: Sequence[int], labels: bool = False) -> np.ndarray:
    """``C x spatial`` to ``C x shape``: linear for images and probabilities,
    nearest for label maps (MONAI's ``Resize``)."""
    from monai.transforms import Resize

    spatial = len(shape)
    mode = "nearest-exact" if labels else ("trilinear" if spatial == 3 else "bilinear")
    kwargs = {} if labels else {"align_corners": False, "anti_aliasing": False}
    out = Resize(spatial_size=tuple(int(v) for v in shape), mode=mode, **kwargs)(
        np.ascontiguousarray(array))
    out = np.asarray(out)
    return out.astype(array.dtype, copy=False)


def scale_intensity(image: np.ndarray, intensity: Intensity) -> np.ndarray:
    """``image`` (C x spatial float32) on the run's scale for its modality."""
    if intensity.scheme == "ct":
        low, high = intensity.clip
        out = np.clip(image, low, high, dtype=np.float32)
        out -= np.float32(intensity.mean)
        out /= np.float32(intensity.std)
        return out
    from monai.transforms import NormalizeIntensity

    return np.asarray(NormalizeIntensity(channel_wise=True)(image), dtype=np.float32)
