import numpy as np
import pytest

from common.data.site import load_site
from common.data.synthetic import scanner_for, write_site


def test_labels_sit_on_the_lesions_in_both_label_formats(synthetic_sites):
    for site in synthetic_sites:
        contrast = scanner_for(int(site.name.split("-")[1])).lesion_contrast
        for case in load_site(site, "training"):
            mask = case.label[0].astype(bool)
            inside = case.image[0][mask].mean()
            body = case.image[0][~mask]
            outside = body[body > np.percentile(body, 40)].mean()  # tissue, not air
            assert (inside - outside) * np.sign(contrast) > 0


def test_sites_have_different_scanners(synthetic_sites):
    means = [np.mean([c.image.mean() for c in load_site(s, "training")])
             for s in synthetic_sites]
    assert len({round(m, -1) for m in means}) == len(means)


def test_generation_is_deterministic(tmp_path):
    a = load_site(write_site(tmp_path / "a", 1, 2, 1, seed=3), "training")
    b = load_site(write_site(tmp_path / "b", 1, 2, 1, seed=3), "training")
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.label, y.label)


def test_dicom_headers_are_synthetic(synthetic_sites):
    import pydicom

    first = next((synthetic_sites[0] / "imagesTr").iterdir())
    ds = pydicom.dcmread(next(first.iterdir()))
    assert str(ds.PatientName).startswith("SYNTHETIC^")
    assert ds.Modality == "CT" and ds.RescaleIntercept != 0


@pytest.mark.slow  # the default suite's 8 minutes
def test_a_synthetic_scanner_of_another_spacing_and_calibration(tmp_path):
    """The same anatomy as another scanner gives it: its own voxel size, its
    Hounsfield units shifted (what the harmonisation benchmark's CT sites are)."""
    from common.data.site import load_site
    from common.data.synthetic import write_site
    from tests.unit.test_cli import fedseg

    plain = load_site(write_site(tmp_path / "a", 0, 1, 1), "training")[0]
    shifted = load_site(write_site(tmp_path / "b", 0, 1, 1, hu_offset=40), "training")[0]
    inside = (plain.image > plain.image.min()) & (plain.image < plain.image.max())
    assert np.allclose((shifted.image - plain.image)[inside], 40)
    fine = load_site(write_site(tmp_path / "c", 0, 1, 1, spacing=(0.75, 2.0)), "training")[0]
    assert fine.spacing == (0.75, 0.75, 2.0) and fine.image.shape == (1, 128, 128, 12)
    assert fine.label.sum() > plain.label.sum() * 2  # the same lesions, in smaller voxels
    done = fedseg("synth", str(tmp_path / "d"), "--sites", "2", "--spacings", "1:5,0.7:2",
                  "--hu-offsets", "0,30")
    assert done.returncode == 0, done.stderr
    assert load_site(tmp_path / "d" / "hospital-0", "test")[0].spacing == (1.0, 1.0, 5.0)
    bad = fedseg("synth", str(tmp_path / "e"), "--sites", "2", "--spacings", "1:5")
    assert bad.returncode != 0 and "--spacings gives 1 scanners for 2 sites" in bad.stderr + \
        bad.stdout
