"""``fedseg site resample``: a NIfTI site written again at another voxel
spacing, as another scanner would give it (what harmonisation is measured
against)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from common.data.site import load_site
from common.data.synthetic import ORGAN_LESION, write_site
from tests.unit.test_cli import fedseg


@pytest.mark.slow  # the default suite's 8 minutes
def test_a_site_resampled_to_another_spacing_reads_as_a_site_on_that_grid(tmp_path):
    source = write_site(tmp_path / "src", 0, 2, 1, seed=4, labels=ORGAN_LESION,
                        image_format="nifti", slices=6)  # 1.5 x 1.5 x 3 mm
    out = tmp_path / "coarse"
    done = fedseg("site", "resample", str(source), str(out), "--spacing", "3,3,3")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "at 3 x 3 x 3 mm (from 1.5 x 1.5 x 3 mm)" in done.stdout
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["labels"] == json.loads((source / "dataset.json").read_text())["labels"]
    assert spec["resampled"]["spacing"] == [3.0, 3.0, 3.0]
    before, after = load_site(source, "training"), load_site(out, "training")
    for a, b in zip(before, after, strict=True):
        assert b.spacing == (3.0, 3.0, 3.0)
        assert b.image.shape[1:] == (a.image.shape[1] // 2, a.image.shape[2] // 2,
                                     a.image.shape[3])
        assert set(np.unique(b.label)) <= set(np.unique(a.label))  # still a label map
    label = next((out / "labelsTr").iterdir())
    assert np.allclose(nib.load(str(label)).header.get_zooms(), (3, 3, 3))
    assert len(load_site(out, "test")) == 1
    again = fedseg("site", "resample", str(source), str(out), "--spacing", "3,3,3")
    assert again.returncode == 2 and "exists and is not empty" in again.stdout
    bad = fedseg("site", "resample", str(source), str(tmp_path / "x"), "--spacing", "3,0,3")
    assert bad.returncode == 2 and "--spacing" in bad.stdout and "0.001" in bad.stdout
