"""DICOM labels as the run's structures: SEG segments and RTSTRUCT ROIs found
by name (label, coded type, the site's aliases), overlaps resolved by the
run's order, contours rasterised onto the series' grid; real files from
../shared/data and synthetic radiotherapy sites."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from common.config import RunSettings, normal_name
from common.data.labels import LabelMap, StructureMissingError, classes_for, site_classes
from common.data.readers import _on_image_grid, read_image, read_label
from common.data.site import load_site
from common.data.synthetic import ORGAN_LESION, write_site
from common.errors import DataError

SERIES = "pydicom_testfiles/test_files/dicomdirtests/77654033/CT2"  # the SEGs' 4-slice CT
OVERLAP = "highdicom_seg/test_files/seg_image_ct_binary_overlap.dcm"  # 1 Bone, 2 Spine
RT = "rtutils_ct_rtstruct/mock_data"


def classes(structures: str, names: dict[int, str], aliases: dict[str, list[str]] | None = None):
    settings = RunSettings.from_run_config({"structures": structures})
    spelled = {normal_name(k): tuple(map(normal_name, v)) for k, v in (aliases or {}).items()}
    return classes_for(LabelMap({0: "background", **names}, spelled), settings)


def segments(dicom_dir: Path, meta) -> dict[str, np.ndarray]:
    """Each segment of the overlap SEG on the series' grid, as highdicom reads it."""
    seg = hd.seg.segread(dicom_dir / OVERLAP)
    out = {}
    for number, label in ((1, "bone"), (2, "spine")):
        pixels = seg.get_pixels_by_source_instance(
            meta.source_uids, segment_numbers=[number], ignore_spatial_locations=True,
            assert_missing_frames_are_empty=True)[..., 0] > 0
        out[label] = _on_image_grid(pixels, meta)  # as the reader puts the series
    return out


# ------------------------------------------------------------------ DICOM SEG


@pytest.mark.parametrize("order", ["bone,spine", "spine,bone"])
def test_seg_segments_become_the_runs_classes_the_later_structure_winning_overlaps(
        dicom_dir, order):
    image, meta = read_image(dicom_dir / SERIES)
    names = order.split(",")
    label = read_label(dicom_dir / OVERLAP, meta,
                       classes(order, {1: names[0], 2: names[1]},
                               {"bone": ["first segment"], "spine": ["second segment"]}))
    truth = segments(dicom_dir, meta)
    assert label.shape == image.shape
    both = truth["bone"] & truth["spine"]
    assert both.any() and (truth["bone"] & ~truth["spine"]).any()  # they do overlap
    first, second = (truth[n] for n in names)
    assert (label[0][both] == 2).all()  # the later structure of the run wins the overlap
    assert (label[0][first & ~second] == 1).all() and (label[0][second] == 2).all()
    assert (label[0][~(first | second)] == 0).all()


def test_seg_segments_are_found_by_coded_type_meaning_or_code(dicom_dir):
    """The segments' labels are 'first segment' and 'second segment'; their coded
    types are SCT 272673000 'Bone' and SCT 421060004 'Spine'."""
    _, meta = read_image(dicom_dir / SERIES)
    truth = segments(dicom_dir, meta)
    # 'Bone' by the code's meaning, the spine by its SNOMED code in the site's aliases
    label = read_label(dicom_dir / OVERLAP, meta,
                       classes("bone,vertebral column", {1: "Bone", 2: "vertebral column"},
                               {"vertebral column": ["SCT:421060004"]}))
    assert (label[0][truth["spine"]] == 2).all()
    assert (label[0][truth["bone"] & ~truth["spine"]] == 1).all()


def test_a_segment_that_matches_no_structure_is_left_out(dicom_dir):
    _, meta = read_image(dicom_dir / SERIES)
    truth = segments(dicom_dir, meta)
    label = read_label(dicom_dir / OVERLAP, meta, classes("spine", {1: "spine"}))
    assert set(np.unique(label)) == {0, 1}
    assert np.array_equal(label[0] == 1, truth["spine"])  # bone is not read as anything


def test_a_seg_without_a_run_structure_is_an_error_naming_it(dicom_dir):
    _, meta = read_image(dicom_dir / SERIES)
    with pytest.raises(StructureMissingError) as info:
        read_label(dicom_dir / OVERLAP, meta,
                   classes("spine,kidney", {1: "spine", 2: "kidney"}))
    text = str(info.value)
    assert "has no segment for 'kidney'" in text and "2 'second segment'" in text
    assert "label_aliases" in text
    assert info.value.scrubbed() == "fedseg data error (label has no 'kidney')"


def test_a_named_run_does_not_take_a_segs_only_segment_of_another_name(dicom_dir):
    _, meta = read_image(dicom_dir / SERIES)
    path = dicom_dir / "highdicom_seg/test_files/seg_image_ct_binary.dcm"
    with pytest.raises(StructureMissingError, match="has no segment for 'liver'"):
        read_label(path, meta, classes("liver", {1: "liver"}))


def test_a_one_structure_run_takes_a_segs_only_segment_whatever_its_name(dicom_dir):
    """An unnamed run, a site whose map calls its structure 'tumour', a SEG
    whose one segment is labelled otherwise: read as before maps existed."""
    _, meta = read_image(dicom_dir / SERIES)
    plain = read_label(dicom_dir / "highdicom_seg/test_files/seg_image_ct_binary.dcm", meta)
    settings = RunSettings.from_run_config({})
    by_map = read_label(dicom_dir / "highdicom_seg/test_files/seg_image_ct_binary.dcm", meta,
                        classes_for(LabelMap({0: "background", 1: "tumour"}), settings))
    assert plain.sum() > 0 and np.array_equal(plain, by_map)


def test_a_fractional_seg_is_in_the_structure_from_one_half(dicom_dir):
    _, meta = read_image(dicom_dir / SERIES)
    path = dicom_dir / "highdicom_seg/test_files/seg_image_ct_true_fractional.dcm"
    seg = hd.seg.segread(path)
    (number,) = seg.segment_numbers
    values = seg.get_pixels_by_source_instance(
        meta.source_uids, segment_numbers=[number], ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True)[..., 0]
    assert ((values > 0) & (values < 0.5)).any()  # a real fraction below the line
    label = read_label(path, meta)
    assert np.array_equal(label[0], _on_image_grid(values >= 0.5, meta))


@pytest.mark.parametrize("frame, said", [
    (None, "as written"),
    (99, "references frame(s) [99] of its image, which has frames 1 to 2: it was drawn on "
         "another image"),
    ("none", "references its multi-frame image without saying which frame"),
])
def test_a_seg_on_an_enhanced_image_is_read_by_its_frame_numbers(dicom_dir, tmp_path, frame,
                                                                 said):
    """A SEG drawn on an enhanced CT (highdicom's own) reads back on its frames;
    one whose frames name a frame the image lacks, or none, is refused rather
    than read as empty slices."""
    image = dicom_dir / "pydicom_data/data/eCT_Supplemental.dcm"
    source = pydicom.dcmread(image)
    code = hd.sr.CodedConcept("91723000", "SCT", "Anatomical structure")
    drawn = np.zeros((2, 512, 512), np.uint8)
    drawn[0, 100:200, 100:200] = 1  # stored frame 1 only
    seg = hd.seg.Segmentation(
        [source], drawn, hd.seg.SegmentationTypeValues.BINARY,
        [hd.seg.SegmentDescription(1, "GTV", code, code,
                                   hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
        hd.UID(), 5, hd.UID(), 1, "fedseg test", "seg", "1", "1")
    for item in seg.PerFrameFunctionalGroupsSequence if frame is not None else []:
        reference = item.DerivationImageSequence[0].SourceImageSequence[0]
        if frame == "none":
            del reference.ReferencedFrameNumber
        else:
            reference.ReferencedFrameNumber = frame
    seg.save_as(tmp_path / "seg.dcm")
    _, meta = read_image(image)
    run = classes("gtv", {1: "GTV"})
    if frame is None:
        label = read_label(tmp_path / "seg.dcm", meta, run)
        assert label.sum() == 100 * 100
        # stored frame 1 lies at z = -159 mm, below frame 2 (-149 mm): on the RAS grid,
        # whose last axis runs inferior to superior, it is the first slice
        assert label[0, ..., 0].sum() == 100 * 100
        return
    with pytest.raises(DataError) as info:
        read_label(tmp_path / "seg.dcm", meta, run)
    assert said in str(info.value)


# ------------------------------------------------------------------ RTSTRUCT


@pytest.fixture
def rt_series(dicom_dir, tmp_path) -> Path:
    """The two CT slices the rt-utils RTSTRUCT was drawn on, as a series folder."""
    folder = tmp_path / "ct"
    folder.mkdir()
    for f in ("ct_1.dcm", "ct_2.dcm"):
        shutil.copy(dicom_dir / RT / f, folder / f)
    return folder


def test_an_rtstruct_roi_is_rasterised_on_its_slice_with_its_hole(dicom_dir, rt_series):
    """ROI 'ROI-1' is, on the slice at z = 60 mm, a 24 mm square with a 15 mm
    square inside it (a hole, even-odd); nothing on the slice at z = 65 mm."""
    image, meta = read_image(rt_series)
    label = read_label(dicom_dir / RT / "rt.dcm", meta,
                       classes("gtv", {1: "GTV"}, {"gtv": ["ROI-1"]}))
    assert label.shape == image.shape == (1, 512, 512, 2)
    at_60, at_65 = label[0, ..., 0], label[0, ..., 1]
    assert at_65.sum() == 0
    rows, cols = np.nonzero(at_60)
    # the reader's grid is RAS: x runs right, so the square's -51..-27 mm (patient
    # LPS x, columns 152-200 from the top-left at -125 mm) are columns 311-359
    spacing = float(pydicom.dcmread(rt_series / "ct_1.dcm").PixelSpacing[0])
    assert (rows.min(), rows.max()) == (311, 359) and (cols.min(), cols.max()) == (311, 359)
    assert 24 / spacing - 2 <= rows.max() - rows.min() + 1 <= 24 / spacing + 1
    centre = (rows.min() + rows.max()) // 2
    assert at_60[centre, centre] == 0  # the hole
    assert at_60[rows.min() + 2, centre] == 1  # the ring
    outer, inner = 49 * 49, 29 * 29  # about: 24 mm and 14-15 mm squares in 0.488 mm pixels
    assert abs(int(at_60.sum()) - (outer - inner)) < 0.1 * outer


@pytest.mark.parametrize("by", ["frame number", "position"])
def test_an_rtstruct_on_an_enhanced_ct_reads_as_on_its_series(dicom_dir, rt_series, tmp_path,
                                                              by):
    """The two slices as one enhanced CT file (highdicom stores the frames in
    the reverse of position order), the RTSTRUCT's contours pointed at its frames (by
    ReferencedFrameNumber, or with no image named: by where the points lie):
    the same label as on the series."""
    import highdicom as hd

    slices = [pydicom.dcmread(f) for f in sorted(rt_series.iterdir())]
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        slices, series_instance_uid=hd.UID(), series_number=9, sop_instance_uid=hd.UID(),
        instance_number=1)
    frame_of = {str(f.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID): k + 1
                for k, f in enumerate(image.PerFrameFunctionalGroupsSequence)}
    enhanced = tmp_path / "ect.dcm"
    image.save_as(enhanced, enforce_file_format=True)
    rt = pydicom.dcmread(dicom_dir / RT / "rt.dcm")
    for roi in rt.ROIContourSequence:
        for contour in roi.ContourSequence:
            if by == "position":
                del contour.ContourImageSequence
                continue
            for ref in contour.ContourImageSequence:
                ref.ReferencedFrameNumber = frame_of[str(ref.ReferencedSOPInstanceUID)]
                ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
    series = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0]
    series.ContourImageSequence[0].ReferencedSOPInstanceUID = image.SOPInstanceUID
    del series.ContourImageSequence[1:]
    rt.save_as(tmp_path / "rt.dcm")
    run = classes("gtv", {1: "GTV"}, {"gtv": ["ROI-1"]})
    _, series_meta = read_image(rt_series)
    on_series = read_label(dicom_dir / RT / "rt.dcm", series_meta, run)
    _, meta = read_image(enhanced)
    assert meta.frames == (2, 1)
    assert on_series[0, ..., 0].sum() > 0
    assert np.array_equal(read_label(tmp_path / "rt.dcm", meta, run), on_series)


@pytest.mark.parametrize("on", ["series", "enhanced"])
def test_an_rtstruct_contour_referencing_another_slice_is_drawn_where_its_points_lie(
        dicom_dir, rt_series, tmp_path, caplog, on):
    """A contour whose image (or frame) reference names the other slice than
    the one its points lie on: the points define a contour (ContourData), so
    it is drawn where they lie, as the file as exported reads, and the
    site's log says so (it was drawn on the slice the reference named)."""
    import highdicom as hd

    slices = [pydicom.dcmread(f) for f in sorted(rt_series.iterdir())]
    uids = [str(s.SOPInstanceUID) for s in slices]
    image_path = rt_series
    if on == "enhanced":
        image = hd.legacy.LegacyConvertedEnhancedCTImage(
            slices, series_instance_uid=hd.UID(), series_number=9, sop_instance_uid=hd.UID(),
            instance_number=1)
        frame_of = {str(f.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID):
                    k + 1 for k, f in enumerate(image.PerFrameFunctionalGroupsSequence)}
        image_path = tmp_path / "ect.dcm"
        image.save_as(image_path, enforce_file_format=True)
    rt = pydicom.dcmread(dicom_dir / RT / "rt.dcm")
    for roi in rt.ROIContourSequence:
        for contour in roi.ContourSequence:
            for ref in contour.ContourImageSequence:
                other = uids[1 - uids.index(str(ref.ReferencedSOPInstanceUID))]
                if on == "enhanced":
                    ref.ReferencedFrameNumber = frame_of[other]
                    ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
                else:
                    ref.ReferencedSOPInstanceUID = other
    if on == "enhanced":
        series = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
            .RTReferencedSeriesSequence[0]
        series.ContourImageSequence[0].ReferencedSOPInstanceUID = image.SOPInstanceUID
        del series.ContourImageSequence[1:]
    rt.save_as(tmp_path / "rt.dcm")
    run = classes("ROI-1", {1: "ROI-1"})
    as_exported = read_label(dicom_dir / RT / "rt.dcm", read_image(rt_series)[1], run)
    assert as_exported.sum() > 0 and "reference another slice" not in caplog.text
    with caplog.at_level("WARNING", logger="common.data.rtstruct"):
        moved = read_label(tmp_path / "rt.dcm", read_image(image_path)[1], run)
    assert np.array_equal(moved, as_exported)
    assert re.search(r"RTSTRUCT rt.dcm: \d+ contour\(s\) reference another slice than the one "
                     r"their points lie on \(the first references slice [12] of 2 in position "
                     r"order, its points lie on slice [12]\); drawn where their points lie",
                     caplog.text)


def test_an_rtstruct_contour_a_little_off_its_single_slice_is_drawn_on_it(
        dicom_dir, rt_series, tmp_path):
    """A one-slice series: a referenced contour 0.6 mm off the slice's plane
    (on no slice by the points' 0.5 mm tolerance) is drawn on the slice it
    references, as before the points were checked."""
    (rt_series / "ct_2.dcm").unlink()
    _, meta = read_image(rt_series)
    kept = str(pydicom.dcmread(rt_series / "ct_1.dcm").SOPInstanceUID)
    rt = pydicom.dcmread(dicom_dir / RT / "rt.dcm")
    z = float(pydicom.dcmread(rt_series / "ct_1.dcm").ImagePositionPatient[2])
    for roi in rt.ROIContourSequence:
        roi.ContourSequence = [c for c in roi.ContourSequence
                               if str(c.ContourImageSequence[0].ReferencedSOPInstanceUID) == kept]
        for contour in roi.ContourSequence:
            contour.ContourData = [f"{z + 0.6:.1f}" if i % 3 == 2 else v
                                   for i, v in enumerate(map(str, contour.ContourData))]
    series = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0]
    series.ContourImageSequence = [r for r in series.ContourImageSequence
                                   if str(r.ReferencedSOPInstanceUID) == kept]
    rt.save_as(tmp_path / "rt.dcm")
    label = read_label(tmp_path / "rt.dcm", meta, classes("ROI-1", {1: "ROI-1"}))
    assert label.shape[0] == 1 and label.sum() > 0


def test_an_rtstruct_whose_roi_has_another_name_is_an_error_naming_the_structure(
        dicom_dir, rt_series):
    _, meta = read_image(rt_series)
    with pytest.raises(StructureMissingError) as info:
        read_label(dicom_dir / RT / "rt.dcm", meta, classes("gtv", {1: "GTV"}))
    assert "RTSTRUCT rt.dcm has no ROI for 'gtv' (its ROIs: 1 'ROI-1')" in str(info.value)


def test_an_rtstruct_whose_referenced_images_are_missing_is_a_data_error(
        dicom_dir, rt_series):
    (rt_series / "ct_2.dcm").unlink()
    _, meta = read_image(rt_series)
    with pytest.raises(DataError, match=r"drawn on 2 image\(s\), 1 of which are not in the "
                                        r"case's image series .* referenced images are missing"):
        read_label(dicom_dir / RT / "rt.dcm", meta, classes("ROI-1", {1: "ROI-1"}))


def test_an_rtstruct_needs_a_dicom_series_as_its_image(dicom_dir, tmp_path):
    import nibabel as nib

    volume = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((512, 512, 2), np.int16), np.eye(4)), str(volume))
    _, meta = read_image(volume)
    with pytest.raises(DataError, match="not a DICOM series with a slice geometry"):
        read_label(dicom_dir / RT / "rt.dcm", meta, classes("ROI-1", {1: "ROI-1"}))


def test_hospital_spellings_of_an_roi_name_match_through_aliases(tmp_path):
    """ROIs written as 'Lung_L' and 'LUNG RIGHT' found as the run's 'lung left' and
    'lung right': one by the site's alias, one by its own name (case, spaces and
    '_' do not count)."""
    site = write_site(tmp_path / "rt", 0, 1, 1, label_format="rtstruct",
                      labels={0: "background", 1: "Lung_L", 2: "LUNG RIGHT"})
    spec = site / "dataset.json"
    import json

    data = json.loads(spec.read_text())
    data["labels"] = {"0": "background", "1": "lung left", "2": "lung right"}
    data["label_aliases"] = {"lung left": ["Lt Lung", "Lung_L"]}
    spec.write_text(json.dumps(data))
    settings = RunSettings.from_run_config({"structures": "lung left,lung right"})
    (case,) = load_site(site, "training", site_classes(site, settings))
    assert set(np.unique(case.label)) == {0, 1, 2}


@pytest.mark.parametrize("label_format", ["rtstruct", "seg"])
def test_synthetic_rtstruct_and_seg_sites_read_as_their_nifti_twin(tmp_path, label_format):
    """The same cases (same seed and site) with RTSTRUCT, multi-segment SEG and
    NIfTI labels read to the same classes, voxel for voxel."""
    settings = RunSettings.from_run_config({"structures": "organ,lesion"})

    def read(fmt: str) -> list[np.ndarray]:
        site = write_site(tmp_path / fmt, 0, 2, 1, labels=ORGAN_LESION, label_format=fmt)
        return [c.label for c in load_site(site, "training", site_classes(site, settings))]

    twins = read("nifti")
    assert all(set(np.unique(t)) == {0, 1, 2} for t in twins)
    for got, want in zip(read(label_format), twins, strict=True):
        assert np.array_equal(got, want)


def _set(ds, how: str) -> None:
    """One hostile or broken edit of an RTSTRUCT."""
    contour = ds.ROIContourSequence[0].ContourSequence[0]
    from pydicom.dataelem import DataElement

    if how == "text-points":  # written as text, as a broken exporter might
        contour.add(DataElement(0x30060050, "LO", ["1", "x", "2"] * 3))
    elif how == "odd-points":
        contour.ContourData = contour.ContourData[:-1]
    elif how == "nan-points":
        contour.ContourData = ["nan"] * 9
    elif how == "huge-points":
        contour.ContourData = ["1e300", "-1e300", str(contour.ContourData[2])] * 4
    elif how == "off-slice":
        del contour.ContourImageSequence
        contour.ContourData = [v if i % 3 != 2 else "9999" for i, v in
                               enumerate(map(str, contour.ContourData))]
    elif how == "other-image":
        contour.ContourImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
    elif how == "roi-number":
        ds.StructureSetROISequence[0].add(DataElement(0x30060022, "LO", "one"))
    elif how == "no-rois":
        del ds.StructureSetROISequence
    elif how == "no-contours":
        del ds.ROIContourSequence


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize("how", ["text-points", "odd-points", "nan-points", "huge-points",
                                 "off-slice", "other-image", "roi-number", "no-rois",
                                 "no-contours"])
def test_a_broken_or_hostile_rtstruct_is_a_data_error_or_reads_safely(tmp_path, how):
    site = write_site(tmp_path / "rt", 0, 1, 1, labels=ORGAN_LESION, label_format="rtstruct")
    path = next((site / "labelsTr").iterdir())
    ds = pydicom.dcmread(path)
    _set(ds, how)
    ds.save_as(path, enforce_file_format=True)
    settings = RunSettings.from_run_config({"structures": "organ,lesion"})
    image, meta = read_image(next((site / "imagesTr").iterdir()))
    with pytest.raises(DataError) as info:  # never another exception, never a wrong mask
        read_label(path, meta, site_classes(site, settings))
    assert path.name in str(info.value) and "Traceback" not in str(info.value)
    if how == "no-contours":  # the ROIs are listed but not drawn: not known to be absent
        assert isinstance(info.value, StructureMissingError)
        assert "draws no closed contour" in str(info.value)


def _one_organ_rt(tmp_path, labels: np.ndarray, names: list[str]):
    """A one-slice DICOM series (from the synthetic writer) and an RTSTRUCT of
    ``labels`` (1 x 64 x 64 classes) with ROIs ``names``."""
    from common.data.rtstruct import write_rtstruct

    site = write_site(tmp_path / "one", 0, 1, 0, labels=ORGAN_LESION, label_format="rtstruct",
                      slices=1)
    series = next((site / "imagesTr").iterdir())
    datasets = [pydicom.dcmread(f) for f in sorted(series.iterdir())]
    write_rtstruct(datasets, labels, names, tmp_path / "rt.dcm")
    return series, tmp_path / "rt.dcm"


def test_rois_of_one_structure_join_and_only_each_rois_own_contours_cut_holes(tmp_path):
    """Two overlapping squares, ROIs 'GTV' and 'GTV_2', both the run's 'gtv'
    (through aliases): the union, the overlap counted once (even-odd applies
    within an ROI, not across the ROIs of a structure)."""
    from common.data.rtstruct import write_rtstruct

    first, second = np.zeros((1, 64, 64), np.uint8), np.zeros((1, 64, 64), np.uint8)
    first[0, 10:30, 10:30] = 1
    second[0, 20:40, 20:40] = 1
    series, rt = _one_organ_rt(tmp_path, first, ["GTV"])
    datasets = [pydicom.dcmread(f) for f in sorted(series.iterdir())]
    write_rtstruct(datasets, second * 2, ["GTV", "GTV_2"], tmp_path / "second.dcm")
    ds = pydicom.dcmread(tmp_path / "second.dcm")  # ROI 1 empty, ROI 2 the second square
    ds.ROIContourSequence[0].ContourSequence = (
        pydicom.dcmread(rt).ROIContourSequence[0].ContourSequence)  # ROI 1: the first
    ds.save_as(rt)
    _, meta = read_image(series)
    label = read_label(rt, meta, classes("gtv", {1: "gtv"}, {"gtv": ["GTV", "GTV_2"]}))
    assert int(label.sum()) == 20 * 20 * 2 - 10 * 10


def test_a_contour_over_64_kib_reads_back_in_either_vr(tmp_path):
    """An outline of thousands of points: written (implicit VR) and read back
    exactly; in explicit VR pydicom stores it as UN bytes, read the same."""
    from pydicom.uid import ExplicitVRLittleEndian

    yy, xx = np.mgrid[:64, :64]
    comb = ((xx % 2 == 0) & (yy > 4) & (yy < 60) & (xx > 2) & (xx < 62)) | (
        (yy >= 58) & (yy < 61) & (xx > 2) & (xx < 62))
    labels = comb[None].astype(np.uint8)
    series, rt = _one_organ_rt(tmp_path, labels, ["organ"])
    ds = pydicom.dcmread(rt)
    contour = ds.ROIContourSequence[0].ContourSequence[0]  # 3,198 points: write them long
    contour.ContourData = [f"{float(v):.6f}" for v in contour.ContourData]
    assert sum(len(str(v)) + 1 for v in contour.ContourData) > 1 << 16
    ds.save_as(rt, enforce_file_format=True)  # implicit VR, as write_rtstruct writes
    _, meta = read_image(series)
    wanted = read_label(rt, meta, classes("organ", {1: "organ"}))
    assert int(wanted.sum()) == int(comb.sum())
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with pytest.warns(UserWarning, match="exceeds the size of 64 kByte"):
        ds.save_as(tmp_path / "explicit.dcm", enforce_file_format=True)
    again = read_label(tmp_path / "explicit.dcm", meta, classes("organ", {1: "organ"}))
    assert np.array_equal(again, wanted)


def test_the_fill_is_scikit_images_polygon_fill_at_a_fraction_of_the_cost():
    """On random polygons (self-intersecting too) the scanline fill gives the
    pixels scikit-image's point-in-polygon fill gives; a zig-zag contour whose
    edges cross every row is refused by the work budget, not computed."""
    from skimage.draw import polygon

    from common.data.rtstruct import _Budget, fill

    rng = np.random.default_rng(0)
    for n in (3, 5, 12, 40):
        for _ in range(25):
            r, c = rng.uniform(-5, 69, n), rng.uniform(-5, 69, n)
            want = np.zeros((64, 64), bool)
            want[polygon(r, c, (64, 64))] = True
            assert np.array_equal(fill(r, c, (64, 64)), want), (n, r, c)
    zig = np.tile([0.0, 4000.0], 1100)
    with pytest.raises(DataError, match="cross the image's pixel rows more than"):
        fill(zig, np.linspace(0, 4000, zig.size), (4096, 4096), _Budget("zig.dcm"))
