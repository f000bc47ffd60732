"""Readers on real files from ../shared/data (pydicom's and highdicom's test
files, the retina sites) and on NIfTI written here."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from common.data.readers import ImageMeta, read_image, read_label
from common.errors import DataError, UnreadableFileError, UnsupportedFormatError

TF = "pydicom_testfiles/test_files"
PD = "pydicom_data/data"


@pytest.mark.parametrize(
    "name",
    [
        f"{TF}/MR_small_RLE.dcm",  # RLE lossless
        f"{TF}/MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
        f"{TF}/MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
        f"{TF}/MR_small_bigendian.dcm",  # explicit VR big endian
        f"{TF}/MR_small_implicit.dcm",  # implicit VR little endian
        f"{TF}/MR_small_expb.dcm",
    ],
)
def test_lossless_transfer_syntaxes_decode_to_the_same_pixels(dicom_dir, name):
    reference, _ = read_image(dicom_dir / f"{TF}/MR_small.dcm")
    image, meta = read_image(dicom_dir / name)
    assert image.shape == reference.shape == (1, 64, 64)
    np.testing.assert_array_equal(image, reference)
    assert meta.spacing == pytest.approx((0.3125, 0.3125))


def test_ct_slice_gets_hounsfield_units(dicom_dir):
    path = dicom_dir / f"{TF}/CT_small.dcm"
    image, _ = read_image(path)
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(np.float32)
    expected = raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(image[0], expected)


def test_rgb_dicom_is_channels_first(dicom_dir):
    image, _ = read_image(dicom_dir / f"{TF}/SC_rgb_jpeg_dcmtk.dcm")
    assert image.shape[0] == 3 and image.ndim == 3


def test_multiframe_dicom_is_a_volume(dicom_dir):
    image, meta = read_image(dicom_dir / f"{PD}/emri_small.dcm")
    ds = pydicom.dcmread(dicom_dir / f"{PD}/emri_small.dcm")
    assert image.shape == (1, ds.Rows, ds.Columns, int(ds.NumberOfFrames))
    assert len(meta.spacing) == 3


def test_an_enhanced_ct_reads_with_its_functional_groups_as_highdicom_places_it(dicom_dir):
    """An enhanced CT keeps its pixel spacing, frame positions and rescale in
    functional groups, not in the image-level attributes: read from there, it
    is the volume (in HU, at 0.39 x 0.39 x 10 mm) highdicom places in patient
    space, in the closest RAS axis order, not stored values at 1 mm."""
    import highdicom as hd

    path = dicom_dir / f"{PD}/eCT_Supplemental.dcm"
    ds = pydicom.dcmread(path)
    assert "PixelSpacing" not in ds and "RescaleIntercept" not in ds  # in the groups only
    image, meta = read_image(path)
    volume = hd.Image.from_dataset(ds).get_volume()  # frames x rows x columns, in LPS
    placed = nib.as_closest_canonical(nib.Nifti1Image(
        np.asarray(volume.array, np.float32), np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine))
    assert np.array_equal(image[0], np.asanyarray(placed.dataobj))
    assert image.min() == -1024  # air, in HU: the groups' rescale intercept applied
    assert np.allclose(meta.spacing, placed.header.get_zooms())
    assert sorted(meta.spacing) == pytest.approx([0.388672, 0.388672, 10.0])
    assert meta.frames == (2, 1) and meta.not_a_volume is None  # frame 2 lies first


def _enhanced_ct(dicom_dir, tmp_path, change=None, name="ect.dcm") -> Path:
    """eCT_Supplemental.dcm, changed by ``change(ds)``, saved under tmp_path."""
    ds = pydicom.dcmread(dicom_dir / f"{PD}/eCT_Supplemental.dcm")
    if change is not None:
        change(ds)
    ds.save_as(tmp_path / name)
    return tmp_path / name


def _hostile_position(ds):
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    plane_position = Tag(0x00209113)  # a sequence, written as a number
    ds.PerFrameFunctionalGroupsSequence[0][plane_position] = RawDataElement(
        plane_position, "DS", 2, b"1 ", 0, False, True)


def _one_item_short(ds):
    del ds.PerFrameFunctionalGroupsSequence[1]


def _huge_slope(ds):
    ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleSlope = 1e38


@pytest.mark.parametrize("change, said", [
    (_hostile_position, "ect.dcm: PlanePositionSequence is not a sequence of items"),
    (_one_item_short, "ect.dcm: PerFrameFunctionalGroupsSequence holds 1 items for its 2 "
                      "frames (NumberOfFrames): the file is damaged"),
    (_huge_slope, "the RescaleSlope of frame 1 is 1e+38, not a rescale"),
])
def test_a_damaged_enhanced_image_is_one_line_naming_what_is_wrong(dicom_dir, tmp_path,
                                                                   change, said):
    with pytest.raises(UnreadableFileError) as info:
        read_image(_enhanced_ct(dicom_dir, tmp_path, change))
    assert said in str(info.value)


def test_an_enhanced_image_of_one_frame_keeps_its_groups_rescale_and_spacing(dicom_dir,
                                                                             tmp_path):
    """One frame of an enhanced CT (a file of an enhanced series, one slice a
    file): in HU at 0.39 mm, its plane geometry from the groups too."""
    def one_frame(ds):
        ds.PixelData = ds.pixel_array[:1].tobytes()
        ds.NumberOfFrames = 1
        del ds.PerFrameFunctionalGroupsSequence[1]

    image, meta = read_image(_enhanced_ct(dicom_dir, tmp_path, one_frame))
    assert image.shape == (1, 512, 512) and image.min() == -1024
    assert meta.spacing == pytest.approx((0.388672, 0.388672))
    from common.data.readers.dicom import _orientation, _position

    ds = pydicom.dcmread(tmp_path / "ect.dcm")
    assert _orientation(ds, "ect.dcm") is not None and _position(ds, "ect.dcm") is not None


def test_the_groups_rescale_is_the_enhanced_images_even_beside_an_image_level_one(
        dicom_dir, tmp_path):
    """pydicom rescales by the image-level attributes only when both slope and
    intercept are there; an enhanced image's rescale is in its groups."""
    def lone_slope(ds):
        ds.RescaleSlope = 1

    image, _ = read_image(_enhanced_ct(dicom_dir, tmp_path, lone_slope))
    assert image.min() == -1024


def test_frames_of_different_pixel_spacing_are_not_one_volume_and_groups_fill_in(
        dicom_dir, tmp_path):
    import copy

    def per_frame_spacing(ds):
        shared = ds.SharedFunctionalGroupsSequence[0]
        measures = shared.PixelMeasuresSequence
        del shared.PixelMeasuresSequence
        for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
            frame.PixelMeasuresSequence = copy.deepcopy(measures)
            frame.PixelMeasuresSequence[0].PixelSpacing = [[0.388672] * 2, [0.8] * 2][k]

    _, meta = read_image(_enhanced_ct(dicom_dir, tmp_path, per_frame_spacing))
    assert "differ in pixel spacing" in meta.not_a_volume

    def thickness_only_per_frame(ds):  # the spacing is the shared group's
        for frame in ds.PerFrameFunctionalGroupsSequence:
            frame.PixelMeasuresSequence = [pydicom.Dataset()]
            frame.PixelMeasuresSequence[0].SliceThickness = 10

    _, meta = read_image(_enhanced_ct(dicom_dir, tmp_path, thickness_only_per_frame, "t.dcm"))
    assert meta.spacing == pytest.approx((0.388672, 0.388672, 10.0)) and not meta.not_a_volume


def test_an_enhanced_image_whose_frames_share_a_position_is_not_one_volume(dicom_dir,
                                                                           tmp_path):
    """Two frames at one place (as a multi-echo MR stores its echoes): a 3D
    model must not take them for a stack."""
    ds = pydicom.dcmread(dicom_dir / f"{PD}/eCT_Supplemental.dcm")
    first, second = (f.PlanePositionSequence[0] for f in ds.PerFrameFunctionalGroupsSequence)
    second.ImagePositionPatient = first.ImagePositionPatient
    ds.save_as(tmp_path / "echoes.dcm")
    _, meta = read_image(tmp_path / "echoes.dcm")
    assert meta.not_a_volume == (
        "multi-frame image echoes.dcm holds 2 or more slices at one position (several "
        "echoes, phases or times in one image?), not one volume")


def test_file_without_preamble_is_still_parsed_as_dicom(dicom_dir):
    # An RT dose file written without preamble or meta header: read as DICOM
    # (not refused as "not DICOM"), then refused for having no pixel data.
    with pytest.raises(UnreadableFileError, match="holds no pixel data"):
        read_image(dicom_dir / f"{TF}/ExplVR_LitEndNoMeta.dcm")


def test_dicom_series_folder_and_its_seg_line_up(dicom_dir):
    series = dicom_dir / f"{TF}/dicomdirtests/77654033/CT2"  # 4 slices, no file suffix
    image, meta = read_image(series)
    assert image.shape == (1, 16, 16, 4)
    assert len(meta.source_uids) == 4
    label = read_label(dicom_dir / "highdicom_seg/test_files/seg_image_ct_binary.dcm", meta)
    assert label.shape == image.shape
    assert set(np.unique(label)) == {0, 1}
    # The SEG covers three of the four slices; the slice it omits is empty.
    per_slice = label[0].sum(axis=(0, 1))
    assert (per_slice > 0).sum() == 3


def test_overlapping_segments_merge_to_one_foreground(dicom_dir):
    import highdicom as hd

    series = dicom_dir / f"{TF}/dicomdirtests/77654033/CT2"
    _, meta = read_image(series)
    path = dicom_dir / "highdicom_seg/test_files/seg_image_ct_binary_overlap.dcm"
    label = read_label(path, meta)
    seg = hd.seg.segread(path)
    per_segment = [
        seg.get_pixels_by_source_instance(meta.source_uids, segment_numbers=[n],
                                          ignore_spatial_locations=True,
                                          assert_missing_frames_are_empty=True).sum()
        for n in seg.segment_numbers
    ]
    assert len(per_segment) == 2
    # the union is at least each segment and less than their sum (they overlap)
    assert max(per_segment) <= label.sum() < sum(per_segment)


@pytest.mark.parametrize(
    ("name", "error"),
    [
        (f"{TF}/MR_truncated.dcm", UnreadableFileError),  # truncated pixel data
        (f"{TF}/JPEG-lossy.dcm", UnreadableFileError),  # 12-bit lossy JPEG: no decoder
        (f"{PD}/emri_small_jpeg_2k_lossless_too_short.dcm", UnreadableFileError),
        (f"{TF}/rtplan.dcm", UnreadableFileError),  # no pixel data
        (f"{PD}/liver.dcm", UnsupportedFormatError),  # a SEG given as image
        (f"{TF}/README.txt", UnsupportedFormatError),  # not DICOM at all
    ],
)
def test_broken_or_wrong_files_get_a_clear_error(dicom_dir, name, error):
    path = dicom_dir / name
    with pytest.raises(error) as info:
        read_image(path)
    assert path.name in str(info.value)
    assert "Traceback" not in str(info.value)


def test_an_rtstruct_at_a_site_without_a_label_map_says_to_name_its_rois(dicom_dir):
    with pytest.raises(DataError, match="RTSTRUCT: its ROIs are found by name, so the site "
                                        "needs a label map"):
        read_label(dicom_dir / "rtutils_ct_rtstruct/mock_data/rt.dcm", ImageMeta("dicom", (1, 1)))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "nothing.png")


def test_chase_png_label_and_jpeg_image(retina_dir):
    site = retina_dir / "chase_db1"
    image, _ = read_image(site / "Image_01L.jpg")
    label = read_label(site / "Image_01L_1stHO.png", ImageMeta("pil", (1, 1)))
    assert image.shape == (3, 960, 999)
    assert label.shape == (1, 960, 999)
    assert set(np.unique(label)) == {0, 1}
    assert 0.03 < label.mean() < 0.15  # vessels are a small fraction of the image


def test_stare_jpeg_label_noise_is_binarised_at_half_max(retina_dir):
    site = retina_dir / "stare"
    path = next((site / "labels-ah-jpg").iterdir())
    raw = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(path).convert("L"))
    assert len(np.unique(raw)) > 2  # JPEG ringing: many grey values
    label = read_label(path, ImageMeta("pil", (1, 1)))
    np.testing.assert_array_equal(label[0], (raw > raw.max() / 2).astype(np.uint8))


def test_nifti_image_and_label_are_reoriented_together(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 5, 4)).astype(np.float32)
    mask = (image > 1).astype(np.uint8)
    affine = np.diag([-2.0, 1.0, 3.0, 1.0])  # x runs right to left: LAS
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(mask, affine), str(tmp_path / "lbl.nii.gz"))
    read, meta = read_image(tmp_path / "img.nii.gz")
    label = read_label(tmp_path / "lbl.nii.gz", meta)
    np.testing.assert_allclose(read[0], image[::-1])  # flipped to RAS
    np.testing.assert_array_equal(label[0], mask[::-1])
    assert meta.spacing == (2.0, 1.0, 3.0)


def test_nifti_voxel_size_is_the_affines_not_a_stale_pixdim(tmp_path):
    # a writer set the sform (0.8 x 1.2 x 2.5 mm) and left pixdim at 1: the
    # geometry (and nibabel, ITK, every viewer) follows the sform
    affine = np.diag([0.8, 1.2, 2.5, 1.0])
    img = nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), affine)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(None, code=0)
    img.header.set_zooms((1.0, 1.0, 1.0))
    nib.save(img, str(tmp_path / "s.nii.gz"))
    assert nib.load(str(tmp_path / "s.nii.gz")).header.get_zooms() == (1.0, 1.0, 1.0)
    _, meta = read_image(tmp_path / "s.nii.gz")
    assert np.allclose(meta.spacing, (0.8, 1.2, 2.5))


def test_png_label_with_255_foreground(tmp_path):
    from PIL import Image

    arr = np.zeros((8, 8), np.uint8)
    arr[2:4, 2:5] = 255
    Image.fromarray(arr).save(tmp_path / "m.png")
    label = read_label(tmp_path / "m.png", ImageMeta("pil", (1, 1)))
    assert label.sum() == 6 and label.max() == 1


def test_unreadable_png_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UnreadableFileError, match="broken.png"):
        read_image(bad)


def test_seg_of_another_series_is_refused(dicom_dir):
    series = dicom_dir / f"{TF}/dicomdirtests/77654033/CT2"
    _, meta = read_image(series)
    with pytest.raises(UnsupportedFormatError, match="another series"):
        read_label(dicom_dir / f"{PD}/liver.dcm", meta)


@pytest.mark.parametrize("name", ["liver_nonbyte_aligned_rle.dcm",
                                  "liver_nonbyte_aligned_deflate.dcm"])
def test_seg_that_does_not_decode_fails_clearly(dicom_dir, name):
    with pytest.raises(DataError) as info:
        read_label(Path(dicom_dir / f"{PD}/{name}"), ImageMeta("dicom", (1.0, 1.0)))
    assert name in str(info.value)


def test_a_truncated_slice_in_a_series_is_an_error_not_skipped(tmp_path):
    from common.data.synthetic import write_site

    site = write_site(tmp_path / "h", 1, 1, 1)
    case = sorted((site / "imagesTs").iterdir())[0]
    first = sorted(case.iterdir())[0]
    first.write_bytes(first.read_bytes()[:400])
    with pytest.raises(UnreadableFileError, match="no pixel data"):
        read_image(case)


def test_slice_positions_written_to_a_tenth_of_a_mm_are_still_one_volume():
    """A 0.625 mm CT whose positions are stored to 0.1 mm has gaps of 0.6 and
    0.7 mm: one volume. The same series missing a slice is not."""
    from common.data.readers.dicom import _not_one_volume

    axial = np.array([1.0, 0, 0, 0, 1, 0])
    positions = [round(k * 0.625, 1) for k in range(40)]
    assert _not_one_volume([axial] * 40, positions, "ct") is None
    del positions[20]
    assert "not evenly spaced" in _not_one_volume([axial] * 39, positions, "ct")
