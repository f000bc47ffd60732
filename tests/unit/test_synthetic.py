import numpy as np

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
