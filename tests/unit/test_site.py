"""Site folders: both layouts, and every bad-input error."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data import cache
from common.data.site import case_key, list_cases, load_case, load_site
from common.data.transforms import prepare, prepared
from common.errors import (
    DataError,
    EmptyDatasetError,
    MissingLabelError,
    ShapeMismatchError,
    UnreadableFileError,
    scrub,
)


def png(path: Path, shape=(32, 32), value=200) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros(shape, np.uint8)
    arr[4:12, 4:12] = value
    Image.fromarray(arr).save(path)


def test_case_key_strips_suffixes_and_channel_tag():
    assert case_key("liver_003_0000.nii.gz") == "liver_003"
    assert case_key("case_7.png") == "case_7"
    assert case_key("series_folder") == "series_folder"


def test_retina_sites_follow_their_dataset_json(retina_dir):
    chase = retina_dir / "chase_db1"
    assert len(list_cases(chase, "training")) == 20
    assert len(list_cases(chase, "test")) == 8
    stare = retina_dir / "stare"
    train = list_cases(stare, "training")
    assert len(train) == 10 and len(list_cases(stare, "test")) == 10
    spec = json.loads((stare / "dataset.json").read_text())
    assert train[0].label == (stare / spec["training"][0]["label"]).resolve()


def test_images_and_labels_folders_pair_by_name(tmp_path):
    for name in ("b", "a"):
        png(tmp_path / "imagesTr" / f"{name}_0000.png")
        png(tmp_path / "labelsTr" / f"{name}.png", value=255)
    png(tmp_path / "imagesTs" / "c.png")
    png(tmp_path / "labelsTs" / "c.png", value=255)
    cases = load_site(tmp_path, "training")
    assert [c.case_id for c in cases] == ["a", "b"]
    assert cases[0].image.shape == (1, 32, 32) and cases[0].label.sum() == 64
    assert len(load_site(tmp_path, "test")) == 1


def test_an_nnunet_dataset_json_gives_the_label_map_and_the_folders_the_cases(tmp_path):
    from common.data.labels import read_label_map

    for folder, name in (("imagesTr", "a_0000"), ("imagesTs", "t_0000")):
        png(tmp_path / folder / f"{name}.png")
    for folder, name in (("labelsTr", "a"), ("labelsTs", "t")):
        png(tmp_path / folder / f"{name}.png", value=2)
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1,
                                                   "Posterior": 2},
         "numTraining": 1, "file_ending": ".png"}))
    assert [c.case_id for c in list_cases(tmp_path, "training")] == ["a"]
    assert [c.case_id for c in list_cases(tmp_path, "test")] == ["t"]
    assert read_label_map(tmp_path).names[2] == "Posterior"
    # a dataset.json that lists a split is that split's list, folders or not
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [], "test": []}))
    with pytest.raises(EmptyDatasetError, match="no training case"):
        list_cases(tmp_path, "training")


def test_synthetic_sites_use_both_layouts_and_label_formats(synthetic_sites):
    even, odd = synthetic_sites[0], synthetic_sites[1]
    assert (even / "dataset.json").exists() and not (odd / "dataset.json").exists()
    assert list_cases(even, "training")[0].label.suffix == ".dcm"  # DICOM SEG
    assert list_cases(odd, "training")[0].label.name.endswith(".nii.gz")
    for site in synthetic_sites:
        case = load_site(site, "test")[0]
        assert case.image.shape == case.label.shape == (1, 64, 64, 8)
        assert case.label.any()


def test_empty_folder_says_what_layout_is_expected(tmp_path):
    with pytest.raises(EmptyDatasetError, match="no dataset.json and no imagesTr"):
        list_cases(tmp_path, "training")


def test_missing_folder(tmp_path):
    with pytest.raises(EmptyDatasetError, match="does not exist"):
        list_cases(tmp_path / "nope", "training")


def test_datalist_with_no_test_cases(tmp_path):
    png(tmp_path / "i.png")
    png(tmp_path / "l.png")
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"training": [{"image": "i.png", "label": "l.png"}], "test": []}))
    assert len(load_site(tmp_path, "training")) == 1
    with pytest.raises(EmptyDatasetError, match="no test case"):
        load_site(tmp_path, "test")


def test_missing_label_names_the_case(tmp_path):
    png(tmp_path / "imagesTr" / "p1.png")
    png(tmp_path / "imagesTr" / "p2.png")
    png(tmp_path / "labelsTr" / "p1.png")
    with pytest.raises(MissingLabelError) as info:
        load_site(tmp_path, "training")
    assert "'p2'" in str(info.value) and info.value.case_index == 1


def test_shape_mismatch_names_the_case_and_both_shapes(tmp_path):
    png(tmp_path / "imagesTr" / "x.png", shape=(32, 32))
    png(tmp_path / "labelsTr" / "x.png", shape=(32, 30))
    with pytest.raises(ShapeMismatchError, match=r"case 'x'.*\(32, 32\).*\(32, 30\)"):
        load_site(tmp_path, "training")


def test_unreadable_file_names_the_case(tmp_path, dicom_dir):
    images = tmp_path / "imagesTr"
    images.mkdir()
    shutil.copy(dicom_dir / "pydicom_testfiles/test_files/MR_truncated.dcm", images / "mr.dcm")
    png(tmp_path / "labelsTr" / "mr.png", shape=(64, 64))
    with pytest.raises(UnreadableFileError, match="case 'mr'.*MR_truncated|case 'mr'.*mr.dcm"):
        load_site(tmp_path, "training")


def test_bad_dataset_json(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read"):
        list_cases(tmp_path, "training")


def test_scrubbed_error_keeps_no_path_or_case_name(tmp_path):
    secret = tmp_path / "PATIENT_SMITH_JOHN"
    png(secret / "imagesTr" / "SMITH_scan.png")
    with pytest.raises(DataError) as info:
        load_site(secret, "training")
    assert "SMITH" in str(info.value)  # the local log has the details
    scrubbed = scrub(info.value)
    assert "SMITH" not in scrubbed and str(tmp_path) not in scrubbed
    assert scrubbed == "fedseg data error in case #0 (missing label)"


def test_scrub_of_a_foreign_exception_keeps_only_its_type():
    assert scrub(FileNotFoundError("/srv/pacs/DOE^JANE/1.dcm")) == (
        "internal error (FileNotFoundError)")


def test_nan_in_an_image_is_refused(tmp_path):
    import nibabel as nib

    arr = np.zeros((8, 8, 3), np.float32)
    arr[0, 0, 0] = np.nan
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / "imagesTr" / "n.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.uint8), np.eye(4)),
             str(tmp_path / "labelsTr" / "n.nii.gz"))
    with pytest.raises(DataError, match="NaN"):
        load_case(list_cases(tmp_path, "training")[0], 0)


def test_prepared_cases_are_normalised_once_and_keep_their_mode(tmp_path):
    png(tmp_path / "imagesTr" / "a.png")
    png(tmp_path / "labelsTr" / "a.png", value=255)
    raw = load_site(tmp_path, "training")
    ready = prepared(raw, "grey")
    image, label = prepare(ready[0], "grey")
    assert image is ready[0].image and label is raw[0].label
    np.testing.assert_allclose(image, prepare(raw[0], "grey")[0])
    assert abs(float(image.mean())) < 1e-5  # z-scored
    with pytest.raises(ValueError, match="prepared for input-channels 'grey', not 'rgb'"):
        prepare(ready[0], "rgb")


def test_a_node_keeps_prepared_cases_until_a_file_changes(tmp_path):
    cache.clear()
    png(tmp_path / "imagesTr" / "a.png")
    png(tmp_path / "labelsTr" / "a.png", value=255)
    first, left_out = cache.load_prepared(tmp_path, "training", "grey")
    again, _ = cache.load_prepared(tmp_path, "training", "grey")
    assert again[0].image is first[0].image and left_out == []  # from memory, not read again
    assert cache.load_prepared(tmp_path, "training", "rgb")[0][0].image.shape == (3, 32, 32)

    png(tmp_path / "labelsTr" / "a.png", shape=(32, 32), value=0)  # relabelled: empty
    changed, _ = cache.load_prepared(tmp_path, "training", "grey")
    assert changed[0].label.sum() == 0 and first[0].label.sum() == 64

    png(tmp_path / "imagesTr" / "b.png")  # a new case without its label: left out, named
    cases, left_out = cache.load_prepared(tmp_path, "training", "grey")
    assert [c.case_id for c in cases] == ["a"]
    assert [(type(e), e.case, e.case_index) for e in left_out] == [(MissingLabelError, "b", 1)]
    png(tmp_path / "labelsTr" / "b.png", value=255)
    assert [c.case_id for c in cache.load_prepared(tmp_path, "training", "grey")[0]] == ["a",
                                                                                      "b"]
    cache.clear()


def broken_folder(root: Path, dicom_dir: Path) -> Path:
    """Training: one good case, one without its label, one truncated DICOM;
    test: one good case."""
    png(root / "imagesTr" / "good.png")
    png(root / "labelsTr" / "good.png", value=255)
    png(root / "imagesTr" / "DOE_nolabel.png")
    (root / "imagesTr").joinpath("DOE_cut.dcm").write_bytes(
        (dicom_dir / "pydicom_testfiles/test_files/CT_small.dcm").read_bytes()[:700])
    png(root / "labelsTr" / "DOE_cut.png")
    png(root / "imagesTs" / "t.png")
    png(root / "labelsTs" / "t.png", value=255)
    return root


def test_a_broken_case_is_left_out_named_locally_counted_in_the_open(tmp_path, dicom_dir):
    from common.data.site import left_out_summary, read_site

    read = read_site(broken_folder(tmp_path, dicom_dir), "training")
    assert [c.case_id for c in read.cases] == ["good"]
    assert sorted((e.case, e.case_index, type(e)) for e in read.left_out) == [
        ("DOE_cut", 0, UnreadableFileError), ("DOE_nolabel", 1, MissingLabelError)]
    summary = left_out_summary(read.left_out)
    assert summary == "1 (missing label), 1 (unreadable file)" and "DOE" not in summary


def test_no_usable_case_is_one_error_with_counts_and_no_names(tmp_path, dicom_dir):
    from common.data.site import NoUsableCaseError, read_site

    broken_folder(tmp_path, dicom_dir)
    for name in ("good.png",):
        (tmp_path / "labelsTr" / name).unlink()
    with pytest.raises(NoUsableCaseError) as info:
        read_site(tmp_path, "training")
    assert "DOE" in str(info.value)  # the site's log names them
    assert scrub(info.value) == ("fedseg data error (no usable training case: 3 left out, "
                                 "2 (missing label), 1 (unreadable file))")


def test_the_site_check_gives_every_case_its_verdict(tmp_path, dicom_dir):
    from common.data.check import check_site

    seen = []
    result = check_site(broken_folder(tmp_path, dicom_dir), on_case=seen.append)
    verdicts = {(c.split, c.case_id): (c.usable, c.problem) for c in result.cases}
    assert verdicts[("training", "good")] == (True, "")
    assert verdicts[("training", "DOE_nolabel")] == (False, "no label file for this image")
    assert not verdicts[("training", "DOE_cut")][0]
    assert "DOE_cut.dcm" in verdicts[("training", "DOE_cut")][1]  # which file, at the site
    assert verdicts[("test", "t")] == (True, "")
    assert len(seen) == 4 and result.can_join and not result.all_usable
    assert result.summary() == ("1 of 3 training cases usable (2 left out); "
                                "1 of 1 test cases usable")
    good = next(c for c in result.cases if c.case_id == "good")
    assert good.shape == (1, 32, 32) and good.foreground == pytest.approx(64 / 1024)
