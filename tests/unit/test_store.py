"""Prepared cases on disk (common/data/store.py): reused while the files are
unchanged, prepared again alone when one changes, resumed after a stop,
never used damaged, memory-mapped only while read, and training and scoring
exactly as in memory."""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common import wire
from common.config import RunSettings
from common.data import cache
from common.data.harmonise import Harmonisation
from common.data.store import DamagedStoreError, StoredCase
from common.data.transforms import Preparation
from common.errors import MissingLabelError
from common.site_algorithm import SiteAlgorithm

SHAPE = (40, 36, 20)


def volume(root: Path, folder: str, name: str, seed: int, shape=SHAPE) -> None:
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 20, shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    c = rng.integers(8, 20, 3)
    label[c[0] - 5:c[0] + 5, c[1] - 4:c[1] + 4, max(0, c[2] - 3):c[2] + 3] = 1
    image[label > 0] += 80
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for sub, data in ((folder, image), (folder.replace("images", "labels"), label)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), str(root / sub / f"{name}.nii.gz"))


def site(root: Path, n_train: int = 4, n_test: int = 2) -> Path:
    for i in range(n_train):
        volume(root, "imagesTr", f"c{i}", seed=i)
    for i in range(n_test):
        volume(root, "imagesTs", f"t{i}", seed=100 + i)
    return root


@pytest.fixture(autouse=True)
def fresh_cache():
    cache.clear()
    yield
    cache.clear()


def committed(store: Path) -> dict[str, float]:
    """case id -> when its prepared copy was written, over every key folder."""
    out = {}
    for meta in store.glob("*/*.json"):
        if meta.name not in ("key.json", "index.json"):
            data = json.loads(meta.read_text())
            out[data["case_id"]] = data["written"]
    return out


def load(folder: Path, store: Path, split="training", **kw):
    return cache.load_prepared(folder, split, Preparation("grey"), store=store, **kw)


def test_prepared_cases_are_reused_until_a_file_changes(tmp_path):
    folder, store = site(tmp_path / "site"), tmp_path / "state" / "prepared"
    cases, left_out = load(folder, store)
    assert [c.case_id for c in cases] == ["c0", "c1", "c2", "c3"] and left_out == []
    assert all(isinstance(c, StoredCase) for c in cases)
    first = committed(store)
    cache.clear()  # a new process: from disk, nothing prepared again
    again, _ = load(folder, store)
    assert committed(store) == first
    np.testing.assert_array_equal(again[1].image, cases[1].image)

    volume(folder, "imagesTr", "c2", seed=7)  # one case rewritten: it alone is prepared again
    changed, _ = load(folder, store)
    now = committed(store)
    assert [k for k in now if now[k] != first[k]] == ["c2"]
    assert not np.array_equal(changed[2].image, cases[1].image)

    volume(folder, "imagesTr", "c9", seed=9)  # added: prepared alone
    (folder / "imagesTr" / "c0.nii.gz").unlink()  # removed: its copy dropped
    (folder / "labelsTr" / "c0.nii.gz").unlink()
    cases, _ = load(folder, store)
    after = committed(store)
    assert [c.case_id for c in cases] == ["c1", "c2", "c3", "c9"]
    assert sorted(after) == ["c1", "c2", "c3", "c9"]
    assert all(after[k] == now[k] for k in ("c1", "c2", "c3"))
    assert len(list(store.glob("*/*.npy"))) == 8  # image and label of each, nothing else
    index = json.loads(next(store.glob("*/index.json")).read_text())
    assert [c["case_id"] for c in index["cases"]] == ["c1", "c2", "c3", "c9"]
    assert all(size > 0 for c in index["cases"] for _, size, _ in c["signature"])


def test_the_state_keeps_the_prepared_sets_of_the_last_runs_only(tmp_path):
    """Each run's spacing makes a prepared set; the state keeps the four read
    last (training and test of two settings), not one more copy per run."""
    import time

    from common.data.harmonise import Intensity
    from common.data.store import KEEP_SETS

    folder, store = site(tmp_path / "site", n_train=2, n_test=1), tmp_path / "state" / "prepared"
    for spacing in (None, (1.0, 1.0, 3.0), (2.0, 2.0, 2.0), (1.5, 1.5, 2.0)):
        for split in ("training", "test"):
            cache.clear()
            cache.load_prepared(folder, split, Preparation("grey", spacing, Intensity()),
                                store=store)
            time.sleep(0.01)  # index.json's times tell the order
    kept = sorted(json.loads((f / "key.json").read_text())["preparation"]
                  for f in store.iterdir())
    assert len(kept) == KEEP_SETS == 4
    assert all("2.0, 2.0, 2.0" in k or "1.5, 1.5, 2.0" in k for k in kept)


def test_unusable_cases_are_left_out_as_in_memory(tmp_path):
    folder, store = site(tmp_path / "site"), tmp_path / "prepared"
    (folder / "labelsTr" / "c1.nii.gz").unlink()
    cases, left_out = load(folder, store)
    assert [c.case_id for c in cases] == ["c0", "c2", "c3"]
    assert [(type(e), e.case, e.case_index) for e in left_out] == [(MissingLabelError, "c1", 1)]
    cache.clear()
    _, in_memory = cache.load_prepared(folder, "training", Preparation("grey"))
    assert [str(e) for e in in_memory] == [str(e) for e in left_out]
    assert not any(str(folder) in e.scrubbed() for e in left_out)


def test_a_stopped_preparation_resumes_with_the_cases_not_yet_written(tmp_path):
    folder, store = site(tmp_path / "site", n_train=5), tmp_path / "prepared"

    def stop_after_two(done, _listed):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        load(folder, store, progress=stop_after_two)
    first = committed(store)
    assert sorted(first) == ["c0", "c1"]
    assert not list(store.glob("*/*.tmp-*"))  # nothing half written left
    # a killed preparation's temporary file (its process gone) is cleared
    key_folder = next(store.glob("*/"))
    stale = key_folder / "abc.image.npy.tmp-999999999"
    stale.write_bytes(b"partial")
    seen = []
    cases, _ = load(folder, store, progress=lambda done, listed: seen.append((done, listed)))
    assert seen[-1] == (5, 5) and len(cases) == 5 and not stale.exists()
    now = committed(store)
    assert now["c0"] == first["c0"] and now["c1"] == first["c1"]  # not prepared again


def test_a_damaged_copy_is_prepared_again_never_used(tmp_path, caplog):
    folder, store = site(tmp_path / "site"), tmp_path / "prepared"
    cases, _ = load(folder, store)
    good = np.array(cases[1].image)
    image_file = next(p for p in store.glob("*/*.image.npy")
                      if p.name.startswith(cases[1]._key))
    with open(image_file, "r+b") as fh:  # truncated
        fh.truncate(image_file.stat().st_size // 2)
    again, _ = load(folder, store)  # served from memory: the size is checked
    np.testing.assert_array_equal(again[1].image, good)
    assert image_file.stat().st_size > 0

    raw = bytearray(image_file.read_bytes())  # same size, header overwritten
    raw[:10] = b"0123456789"
    image_file.write_bytes(bytes(raw))
    with pytest.raises(DamagedStoreError, match="c1.*cannot be read back"):
        again[1].image  # noqa: B018 - the case in use: named, and forgotten
    cache.clear()
    fresh, _ = load(folder, store)
    np.testing.assert_array_equal(fresh[1].image, good)

    raw = image_file.read_bytes()  # same size, a valid header of another type
    assert b"'<f4'" in raw[:128]
    image_file.write_bytes(raw.replace(b"'<f4'", b"'<i4'", 1))
    cache.clear()
    with caplog.at_level("WARNING"):
        fresh, _ = load(folder, store)
    assert "'c1': its prepared copy is damaged" in caplog.text
    np.testing.assert_array_equal(fresh[1].image, good)


def test_cases_on_disk_hold_no_array_and_nothing_stays_mapped(tmp_path):
    """Resident memory does not grow with the site: each case is a handle of
    a few numbers; its arrays are mapped while read, and unmapped after
    training and scoring."""
    folder, store = site(tmp_path / "site"), tmp_path / "prepared"
    settings = RunSettings.from_run_config(SMALL_3D)
    algo = SiteAlgorithm(settings, "a", folder, device="cpu", store=store)
    cases = algo.cases("training")
    assert isinstance(cases[0].image, np.memmap) and isinstance(cases[0].label, np.memmap)
    held = sum(v.nbytes for c in cases for v in vars(c).values() if isinstance(v, np.ndarray))
    volumes = sum(c.image.nbytes + c.label.nbytes for c in cases)
    assert held < volumes / 50  # the per-plane foreground counts (8 bytes a plane)
    algo.train(None, {"server-round": 1})
    algo.evaluate(None, {})
    maps = Path(f"/proc/{os.getpid()}/maps")
    if maps.exists():
        assert str(store.resolve()) not in maps.read_text()


SMALL_3D = {"model-spatial-dims": 3, "patch-size": 16, "batch-size": 2,
            "patches-per-image": 2, "model-channels": "4,8", "local-epochs": 1,
            "num-rounds": 1}


@pytest.mark.parametrize("dims,spacing", [(3, (1.0, 1.0, 1.0)), (2, None)])
def test_on_disk_trains_and_scores_as_in_memory(tmp_path, dims, spacing):
    """The same seed gives the same weights, loss and scores from disk as
    from memory (3D: whole volumes, crop centres picked from the stored
    label, test cases resampled and scored on their own grid; 2D: slices)."""
    folder = site(tmp_path / "site")
    settings = RunSettings.from_run_config({**SMALL_3D, "model-spatial-dims": dims})
    results = []
    for store in (None, tmp_path / "prepared"):
        cache.clear()
        torch.manual_seed(0)
        algo = SiteAlgorithm(settings, "a", folder, device="cpu", store=store)
        config = {"server-round": 1}
        if spacing:
            config[wire.HARMONISATION] = Harmonisation(spacing=spacing).to_wire()
        weights, metrics = algo.train(None, config)
        scores = algo.evaluate(None, config)
        metrics.pop("train-seconds")
        results.append((weights, metrics, scores))
        if store is not None:
            test = algo.cases("test")
            assert isinstance(test[0], StoredCase)
            assert (test[0].source is not None) == (spacing is not None)
    (w0, m0, s0), (w1, m1, s1) = results
    assert m0 == m1 and s0 == s1
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
