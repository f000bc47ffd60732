"""fedseg partition: many site folders from one dataset (MSD or nnU-Net form),
linked not copied, even or skewed by structure size, reproducible, and read
by the project's own site reader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.data.partition import band_sizes, held_out_count, partition, read_source
from common.data.site import list_cases, load_case, load_site
from common.errors import (
    ConfigError,
    EmptyDatasetError,
    MissingLabelError,
    ShapeMismatchError,
    UnsupportedFormatError,
)

SHARED = Path(os.environ.get("FEDSEG_SHARED_DATA",
                             Path(__file__).resolve().parents[3] / "shared" / "data"))
LABELS_MSD = {"0": "background", "1": "lesion"}
LABELS_NNUNET = {"background": 0, "lesion": 1}


def _volume(path: Path, case: int, label: bool) -> None:
    """A 12 x 12 x 4 volume; the label's cube grows with the case number, so
    case ``i`` holds ``(i % 10 + 1) * 4`` labelled voxels (sizes repeat past 10)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(case)
    if label:
        arr = np.zeros((12, 12, 4), np.uint8)
        side = case % 10 + 1
        arr[:side, :1, :4] = 1  # side x 1 x 4 voxels
    else:
        arr = rng.normal(100, 10, (12, 12, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))


def msd(root: Path, n: int = 10, attributes: bool = False) -> Path:
    """A Decathlon-form dataset of ``n`` cases."""
    training = []
    for i in range(n):
        _volume(root / "imagesTr" / f"case_{i:03d}.nii.gz", i, label=False)
        _volume(root / "labelsTr" / f"case_{i:03d}.nii.gz", i, label=True)
        entry = {"image": f"./imagesTr/case_{i:03d}.nii.gz",
                 "label": f"./labelsTr/case_{i:03d}.nii.gz"}
        if attributes:
            entry["age"] = 90 - i  # oldest first
        training.append(entry)
    (root / "dataset.json").write_text(json.dumps({
        "name": "Toy", "modality": {"0": "CT"}, "labels": LABELS_MSD,
        "numTraining": n, "training": training, "test": []}))
    return root


def nnunet(root: Path, n: int = 10, with_json: bool = True) -> Path:
    """An nnU-Net v2 dataset: imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz."""
    for i in range(n):
        _volume(root / "imagesTr" / f"toy_{i:03d}_0000.nii.gz", i, label=False)
        _volume(root / "labelsTr" / f"toy_{i:03d}.nii.gz", i, label=True)
    if with_json:
        (root / "dataset.json").write_text(json.dumps({
            "name": "Dataset001_Toy", "channel_names": {"0": "CT"}, "labels": LABELS_NNUNET,
            "numTraining": n, "file_ending": ".nii.gz"}))
    return root


def site_cases(out: Path, name: str) -> dict[str, list[str]]:
    spec = json.loads((out / name / "dataset.json").read_text())
    return {split: [Path(e["image"]).name for e in spec[split]] for split in ("training", "test")}


def assignment(out: Path) -> dict[str, dict[str, list[str]]]:
    summary = json.loads((out / "partition.json").read_text())
    return {s["name"]: site_cases(out, s["name"]) for s in summary["sites"]}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return msd(tmp_path_factory.mktemp("msd"), n=11)


# ------------------------------------------------------------------ even split


@pytest.mark.parametrize("form", ["msd", "nnunet", "folders"])
def test_even_split_covers_every_case_once_in_sizes_one_apart(tmp_path, form):
    src = tmp_path / "src"
    if form == "msd":
        msd(src, n=11)
    else:
        nnunet(src, n=11, with_json=form == "nnunet")
    out = tmp_path / "out"
    result = partition(src, out, 3)
    assert result["source_form"] == form and result["cases"] == 11
    sizes = [s["cases"] for s in result["sites"]]
    assert sizes == band_sizes(11, 3) == [4, 4, 3] and max(sizes) - min(sizes) <= 1
    seen: list[str] = []
    for site in result["sites"]:
        assert site["test"] == held_out_count(site["cases"], 0.2) == 1
        training, test = list_cases(out / site["name"], "training"), list_cases(
            out / site["name"], "test")
        assert (len(training), len(test)) == (site["training"], site["test"])
        seen += [ref.case_id for ref in training + test]
    expected = [f"{'case' if form == 'msd' else 'toy'}_{i:03d}" for i in range(11)]
    assert sorted(seen) == expected  # every case, exactly once

    spec = json.loads((out / "site-2" / "dataset.json").read_text())
    assert spec["partition"] == {
        "source": str(src.resolve()), "source_name": "Toy" if form == "msd" else
        "Dataset001_Toy" if form == "nnunet" else "src", "source_form": form,
        "split": "even", "by": None, "seed": 0, "test_fraction": 0.2,
        "site": 2, "sites": 3, "site_name": "site-2"}
    if form == "msd":
        assert spec["labels"] == LABELS_MSD and spec["modality"] == {"0": "CT"}
    elif form == "nnunet":  # the label map as the source wrote it; modality both ways
        assert spec["labels"] == LABELS_NNUNET
        assert spec["channel_names"] == spec["modality"] == {"0": "CT"}
        assert spec["training"][0]["image"].endswith("_0000.nii.gz")  # names kept
    else:
        assert "labels" not in spec
    # the project's own reader takes the folder, through the label map when it has one
    case = load_site(out / "site-3", "test")[0]
    assert case.label.shape == (1, 12, 12, 4) and case.label.max() == 1


def test_files_are_symlinks_to_the_source_never_copies(tmp_path, toy):
    out = tmp_path / "out"
    assert partition(toy, out, 2)["files"] == "symlinks"
    files = [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]
    data = [p for p in files if p.name.endswith(".nii.gz")]
    assert len(data) == 2 * 11  # an image and a label per case
    for link in data:
        assert link.is_symlink()
        target = Path(os.readlink(link))
        assert target.is_absolute() and target.parent.parent == toy.resolve()
        assert target.name == link.name
    assert sorted(p.name for p in files if p not in data) == [
        "dataset.json", "dataset.json", "partition.json"]


def test_without_symlinks_the_site_names_the_source_files_by_absolute_path(
        tmp_path, toy, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", refuse)
    out = tmp_path / "out"
    assert partition(toy, out, 2)["files"] == "absolute paths"
    assert not list(out.rglob("*.nii.gz"))  # nothing linked, nothing copied
    spec = json.loads((out / "site-1" / "dataset.json").read_text())
    assert all(Path(e[k]).is_absolute() and Path(e[k]).is_file()
               for e in spec["training"] + spec["test"] for k in ("image", "label"))
    assert len(load_site(out / "site-1", "training")) == spec["numTraining"]


# -------------------------------------------------------------- reproducible


def test_same_seed_same_output_other_seed_other_assignment(tmp_path, toy):
    partition(toy, tmp_path / "a", 3, seed=7)
    partition(toy, tmp_path / "b", 3, seed=7)
    partition(toy, tmp_path / "c", 3, seed=8)
    for name in ("partition.json", "site-1/dataset.json", "site-3/dataset.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    assert assignment(tmp_path / "a") != assignment(tmp_path / "c")
    # the skewed bands do not depend on the seed, only each site's test cases
    partition(toy, tmp_path / "s7", 3, split="skewed", seed=7)
    partition(toy, tmp_path / "s8", 3, split="skewed", seed=8)
    a, b = assignment(tmp_path / "s7"), assignment(tmp_path / "s8")
    assert all(sorted(sum(a[s].values(), [])) == sorted(sum(b[s].values(), [])) for s in a)
    assert a != b


# ------------------------------------------------------------------- skewed


def _labelled(out: Path, site: str) -> list[int]:
    return [int(np.count_nonzero(c.label)) for c in
            load_site(out / site, "training") + load_site(out / site, "test")]


def test_skewed_split_gives_sites_bands_of_structure_size(tmp_path):
    src = nnunet(tmp_path / "src", n=10)
    out = tmp_path / "out"
    result = partition(src, out, 3, split="skewed", names=["small", "mid", "large"])
    assert result["by"] == "labelled voxels"
    assert [s["name"] for s in result["sites"]] == ["small", "mid", "large"]
    sizes = {s: _labelled(out, s) for s in ("small", "mid", "large")}
    assert np.median(sizes["small"]) < np.median(sizes["mid"]) < np.median(sizes["large"])
    assert max(sizes["small"]) < min(sizes["mid"]) and max(sizes["mid"]) < min(sizes["large"])
    ranges = {s["name"]: s["labelled_voxels"] for s in result["sites"]}
    assert ranges["small"] == {"min": 4, "median": 10, "max": 16}  # cases 0..3
    assert ranges["large"] == {"min": 32, "median": 36, "max": 40}  # cases 7..9
    for site in result["sites"]:
        assert (min(sizes[site["name"]]), max(sizes[site["name"]])) == (
            site["labelled_voxels"]["min"], site["labelled_voxels"]["max"])


def test_skewed_by_a_per_case_attribute(tmp_path):
    src = msd(tmp_path / "src", n=9, attributes=True)
    out = tmp_path / "out"
    result = partition(src, out, 3, split="skewed", by="age", test_fraction=0)
    assert [s["by_range"] for s in result["sites"]] == [
        {"min": 82, "median": 83, "max": 84}, {"min": 85, "median": 86, "max": 87},
        {"min": 88, "median": 89, "max": 90}]
    spec = json.loads((out / "site-1" / "dataset.json").read_text())
    assert spec["test"] == [] and [e["age"] for e in spec["training"]] == [84, 83, 82]
    with pytest.raises(ConfigError, match="--by weight: 9 cases .* have no 'weight'.*age"):
        partition(src, tmp_path / "o2", 3, split="skewed", by="weight")
    with pytest.raises(ConfigError, match="--by goes with --split skewed"):
        partition(src, tmp_path / "o3", 3, by="age")
    with pytest.raises(ConfigError, match="no per-case attributes"):
        partition(nnunet(tmp_path / "nn", n=3), tmp_path / "o4", 3, split="skewed", by="age")


# ------------------------------------------------------------------- refused


def test_refuses_bad_counts_and_a_used_output_folder(tmp_path, toy):
    with pytest.raises(ConfigError, match="--sites must be at least 1, not 0"):
        partition(toy, tmp_path / "o", 0)
    with pytest.raises(ConfigError, match="cannot make 12 sites from 11 cases"):
        partition(toy, tmp_path / "o", 12)
    with pytest.raises(ConfigError, match="--test-fraction"):
        partition(toy, tmp_path / "o", 2, test_fraction=1.0)
    with pytest.raises(ConfigError, match="--names gives 1 name"):
        partition(toy, tmp_path / "o", 2, names=["a"])
    with pytest.raises(ConfigError, match="not a folder name"):
        partition(toy, tmp_path / "o", 2, names=["a", "../b"])
    assert not (tmp_path / "o").exists()  # refused before anything is written
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        partition(toy, tmp_path / "used", 2)
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["notes.txt"]
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        partition(toy, tmp_path / "afile", 2)
    assert (tmp_path / "afile").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert partition(toy, tmp_path / "empty", 11, test_fraction=0.5)["sites"][0] == {
        "name": "site-1", "folder": "site-1", "site": 1, "cases": 1, "training": 1, "test": 0}


def test_refuses_hostile_options_and_outputs_leaving_nothing_half_written(tmp_path, toy,
                                                                          monkeypatch):
    with pytest.raises(ConfigError, match="--seed must be a whole number of 0 or more, not -1"):
        partition(toy, tmp_path / "o", 2, seed=-1)
    with pytest.raises(ConfigError, match="'partition.json' is taken"):
        partition(toy, tmp_path / "o", 2, names=["partition.json", "b"])
    assert not (tmp_path / "o").exists()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="symbolic link to nothing"):
        partition(toy, tmp_path / "dangling", 2)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ConfigError, match="cannot create output folder"):
        partition(toy, tmp_path / "file" / "out", 2)
    with pytest.raises(ConfigError, match="is inside the dataset"):
        partition(toy, toy / "sites", 2)
    assert not (toy / "sites").exists()
    # a failure while writing (here: the disk fills at the second site) leaves
    # no OUT and no hidden partial folder behind
    before = sorted(p.name for p in tmp_path.iterdir())
    import common.data.partition as part

    real = part._place

    def failing(target, link, site_dir):
        if "site-2" in str(site_dir):
            raise OSError("disk full")
        return real(target, link, site_dir)

    monkeypatch.setattr(part, "_place", failing)
    with pytest.raises(OSError, match="disk full"):
        partition(toy, tmp_path / "half", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert sorted(p.name for p in toy.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]


def test_refuses_a_label_of_another_shape_and_a_sort_key_that_is_not_a_number(tmp_path):
    src = msd(tmp_path / "src", n=4, attributes=True)
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 4), np.uint8), np.eye(4)),
             str(src / "labelsTr" / "case_002.nii.gz"))
    with pytest.raises(ShapeMismatchError,
                       match=r"'case_002' \(image \(12, 12, 4\), label \(12, 10, 4\)\)"):
        partition(src, tmp_path / "o", 2)
    _volume(src / "labelsTr" / "case_002.nii.gz", 2, label=True)
    spec = json.loads((src / "dataset.json").read_text())
    spec["training"][1]["age"] = float("nan")
    (src / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="--by age: case 'case_001' has a value that is not "
                                          "a finite number"):
        partition(src, tmp_path / "o", 2, split="skewed", by="age")
    assert not (tmp_path / "o").exists()


def test_an_existing_empty_output_folder_is_filled_not_replaced(tmp_path, toy):
    out = tmp_path / "group-private"
    out.mkdir()
    out.chmod(0o2750)  # its owner's choice of who may read the sites
    inode = out.stat().st_ino
    partition(toy, out, 2)
    assert out.stat().st_ino == inode and (out.stat().st_mode & 0o7777) == 0o2750
    assert sorted(p.name for p in out.iterdir()) == ["partition.json", "site-1", "site-2"]


def test_a_label_stored_in_another_axis_order_is_the_same_grid(tmp_path):
    src = msd(tmp_path / "src", n=4)
    label = nib.load(str(src / "labelsTr" / "case_001.nii.gz"))
    # the same voxels stored A, S, R instead of R, A, S: another axis order, one grid
    swapped = np.transpose(np.asanyarray(label.dataobj), (1, 2, 0))
    affine = label.affine[:, [1, 2, 0, 3]]
    nib.save(nib.Nifti1Image(swapped, affine), str(src / "labelsTr" / "case_001.nii.gz"))
    assert partition(src, tmp_path / "o", 2)["cases"] == 4


def test_a_sort_key_too_large_for_a_float_still_sorts(tmp_path):
    src = msd(tmp_path / "src", n=4, attributes=True)
    spec = json.loads((src / "dataset.json").read_text())
    spec["training"][0]["age"] = 10 ** 400
    (src / "dataset.json").write_text(json.dumps(spec))
    result = partition(src, tmp_path / "o", 2, split="skewed", by="age", test_fraction=0)
    assert result["sites"][1]["by_range"]["max"] == 10 ** 400


def test_refuses_a_dataset_without_cases(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(EmptyDatasetError, match="has no case"):
        partition(tmp_path / "nothing", tmp_path / "o", 2)
    (tmp_path / "nothing" / "imagesTr").mkdir()
    with pytest.raises(EmptyDatasetError, match="has no case"):
        partition(tmp_path / "nothing", tmp_path / "o", 2)
    with pytest.raises(EmptyDatasetError, match="does not exist"):
        partition(tmp_path / "absent", tmp_path / "o", 2)
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "dataset.json").write_text('{"name": "x", "training": []}')
    with pytest.raises(EmptyDatasetError, match="'training' list of its dataset.json is empty"):
        partition(tmp_path / "listed", tmp_path / "o", 2)
    assert not (tmp_path / "o").exists()


def test_refuses_cases_without_labels_naming_them(tmp_path):
    src = msd(tmp_path / "msd", n=4)
    (src / "labelsTr" / "case_002.nii.gz").unlink()
    with pytest.raises(MissingLabelError, match="case 'case_002' in .* has no label file"):
        partition(src, tmp_path / "o", 2)
    src = nnunet(tmp_path / "nn", n=4)
    (src / "labelsTr" / "toy_001.nii.gz").unlink()
    (src / "labelsTr" / "toy_003.nii.gz").unlink()
    with pytest.raises(MissingLabelError, match="2 cases 'toy_001', 'toy_003' .* have no label"):
        partition(src, tmp_path / "o", 2)
    spec = json.loads((tmp_path / "msd" / "dataset.json").read_text())
    spec["training"].append("./imagesTr/case_001.nii.gz")  # a bare image path
    (tmp_path / "msd" / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(MissingLabelError, match="2 cases"):
        partition(tmp_path / "msd", tmp_path / "o", 2)
    assert not (tmp_path / "o").exists()


def test_refuses_several_channels(tmp_path):
    src = nnunet(tmp_path / "nn", n=3)
    _volume(src / "imagesTr" / "toy_001_0001.nii.gz", 1, label=False)
    with pytest.raises(UnsupportedFormatError, match="'toy_001' .* several channel files"):
        read_source(src)
    spec = json.loads((src / "dataset.json").read_text())
    (src / "imagesTr" / "toy_001_0001.nii.gz").unlink()
    (src / "dataset.json").write_text(json.dumps({**spec, "channel_names": {"0": "T2",
                                                                             "1": "ADC"}}))
    with pytest.raises(UnsupportedFormatError, match="2 input channels"):
        read_source(src)


def test_one_file_name_in_two_folders_becomes_two_cases(tmp_path):
    root = tmp_path / "src"
    for i, patient in enumerate(("p1", "p2", "p3")):
        _volume(root / patient / "image.nii.gz", i, label=False)
        _volume(root / patient / f"{patient}_seg.nii.gz", i, label=True)  # distinct names
    (root / "dataset.json").write_text(json.dumps({"labels": LABELS_MSD, "training": [
        {"image": f"{p}/image.nii.gz", "label": f"{p}/{p}_seg.nii.gz"}
        for p in ("p1", "p2", "p3")]}))
    partition(root, tmp_path / "out", 1, test_fraction=0)
    ids = sorted(c.case_id for c in load_site(tmp_path / "out" / "site-1", "training"))
    assert ids == ["image", "image-2", "image-3"]
    # each label named as its image is, so a person sees the pairs in the folders
    site = tmp_path / "out" / "site-1"
    assert sorted(p.name for p in (site / "labelsTr").iterdir()) == sorted(
        p.name for p in (site / "imagesTr").iterdir()) == [
        "image-2.nii.gz", "image-3.nii.gz", "image.nii.gz"]


def test_cli(tmp_path, toy, capsys):
    from server.cli import main

    assert main(["partition", str(toy), str(tmp_path / "out"), "--sites", "2", "--split",
                 "skewed", "--seed", "3", "--names", "a,b"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "11 cases of Toy" in said and "symlinks" in said
    assert (tmp_path / "out" / "a" / "dataset.json").is_file()
    assert main(["partition", str(toy), str(tmp_path / "out"), "--sites", "2"]) == 2
    assert "exists and is not empty" in " ".join(capsys.readouterr().out.split())
    # sites of a single case cannot hold one out to test on: said, named
    assert main(["partition", str(toy), str(tmp_path / "many"), "--sites", "11"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "11 site(s) hold a single case and so no test case (site-1, site-2" in said, said
    assert main(["partition", str(toy), str(tmp_path / "few"), "--sites", "2"]) == 0
    assert "no test case" not in " ".join(capsys.readouterr().out.split())


# ----------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def hippocampus() -> Path:
    path = SHARED / "hippocampus"
    if not (path / "dataset.json").is_file():
        pytest.skip(f"real data not available: {path} is absent (see ../shared/data/README.md)")
    return path


def test_hippocampus_in_three_sites(tmp_path, hippocampus):
    result = partition(hippocampus, tmp_path / "even", 3)
    assert [s["cases"] for s in result["sites"]] == [67, 67, 66]
    for site in result["sites"]:
        assert site["test"] == 13
        for split in ("training", "test"):
            ref = list_cases(tmp_path / "even" / site["name"], split)[0]
            case = load_case(ref, 0)
            assert case.image.ndim == 4 and case.label.shape == case.image.shape
    skewed = partition(hippocampus, tmp_path / "skewed", 3, split="skewed")["sites"]
    medians = [s["labelled_voxels"]["median"] for s in skewed]
    assert medians == sorted(medians) and skewed[0]["labelled_voxels"]["max"] <= skewed[1][
        "labelled_voxels"]["min"]
