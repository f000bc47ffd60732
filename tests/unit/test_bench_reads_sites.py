"""``fedseg bench quality`` compares like with like: its local-only and pooled
models learn, and are scored on, each site exactly as the site's federated
node reads it (issue 27: they read the sites without their label maps, so on a
site whose structure has the dark value the baselines learned the background)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import server.bench
from common.config import RunSettings
from common.inference import load_model
from common.site_algorithm import SiteAlgorithm
from server.cli import main as cli_main
from server.simulation import Site


def _site(root: Path, name: str, labels: dict[str, str], structure_value: int,
          background_value: int, broken: bool = False) -> Path:
    """A PNG site whose 'membrane' (a band across each image) has
    ``structure_value`` in the label files."""
    rng = np.random.default_rng(len(name))
    site = root / name
    site.mkdir(parents=True)
    entries = {"training": [], "test": []}
    for i, split in enumerate(["training", "training", "training", "test"]):
        image = rng.integers(0, 60, (48, 48), dtype=np.uint8)
        label = np.full((48, 48), background_value, np.uint8)
        rows = slice(10 + 3 * i, 22 + 3 * i)
        image[rows] += 150
        label[rows] = structure_value
        Image.fromarray(image).save(site / f"img{i}.png")
        Image.fromarray(label).save(site / f"lab{i}.png")
        entries[split].append({"image": f"img{i}.png", "label": f"lab{i}.png"})
    if broken:  # a case the node leaves out (unreadable), which must not stop the bench
        (site / "bad.png").write_bytes(b"not a png")
        entries["training"].append({"image": "bad.png", "label": "lab0.png"})
    (site / "dataset.json").write_text(json.dumps({"labels": labels, **entries}))
    return site


def test_the_baselines_learn_each_site_as_its_node_reads_it(tmp_path, monkeypatch):
    sites = [
        Site("dark", _site(tmp_path, "dark", {"0": "membrane", "255": "background"}, 0, 255,
                           broken=True)),
        Site("plain", _site(tmp_path, "plain", {"0": "background", "1": "membrane"}, 1, 0)),
    ]
    overrides = {"model-channels": "8,16", "patch-size": 16, "batch-size": 4,
                 "structures": "membrane", "evaluate-every": 1}
    seen: dict[str, list] = {}
    centralised = server.bench._centralised

    trained: dict[str, SiteAlgorithm] = {}

    def spy(algo, tests):  # what each baseline trains and is scored on, then the real thing
        trained[algo.site] = algo
        seen[algo.site] = [c.label for c in algo.cases("training")]
        seen.update({f"test:{name}": [c.label for c in cases] for name, cases in tests.items()})
        return centralised(algo, tests)

    monkeypatch.setattr(server.bench, "_centralised", spy)
    report = server.bench.quality(sites, tmp_path / "out", overrides, rounds=1, local_epochs=1,
                                  methods=("local", "pooled"))

    settings = RunSettings.from_run_config({**overrides, "num-rounds": 1})
    for site in sites:  # the federation's own reading of the same folders
        node = SiteAlgorithm(settings, site.name, site.data_dir, device="cpu")
        want = node.cases("training")
        assert [np.array_equal(a, c.label) for a, c in zip(seen[site.name], want,
                                                           strict=True)] == [True] * 3
        test = node.cases("test")
        assert all(np.array_equal(a, c.label) for a, c in zip(seen[f"test:{site.name}"], test,
                                                               strict=True))
        # the membrane band is class 1 at both sites, whatever value the file holds
        assert all(c.label.sum() == 12 * 48 for c in want)
    pooled = seen["pooled"]
    assert len(pooled) == 6 and all(lab.sum() == 12 * 48 for lab in pooled)
    assert report["cases"]["dark"] == {"training": 3, "test": 1,
                                       "left_out": {"training": 1, "test": 0}}
    table = (tmp_path / "out" / "quality.md").read_text()
    assert "dark 3 training / 1 test (1 left out as unusable)" in table
    assert ("Scored, as each site's label map names it: dark: membrane = value 0; plain: "
            "membrane = value 1.") in table
    # every baseline's final model is kept, self-contained, and scores again
    # through `fedseg evaluate` as the table says (cases no method saw, later)
    for method, name in (("pooled", "pooled"), ("local/dark", "dark"), ("local/plain", "plain")):
        kept = load_model(tmp_path / "out" / method / "final_model.pt")
        want = trained[name].model.state_dict()
        assert all(torch.equal(v, want[k]) for k, v in kept.model.state_dict().items())
        assert kept.settings == trained[name].settings
    scores = tmp_path / "dark.csv"
    assert cli_main(["evaluate", str(tmp_path / "out" / "pooled" / "final_model.pt"),
                     str(sites[0].data_dir), "--csv", str(scores)]) == 0
    rows = {r["case"]: r for r in csv.DictReader(scores.open())}
    assert float(rows["mean"]["dice"]) == pytest.approx(report["results"]["pooled"]["sites"]["dark"]
                                               ["dice"], abs=1e-6)
    flips = report["test_time_flips"]  # the pooled model scored both ways
    assert flips["spatial_dims"] == 2 and 0 <= flips["dice_without"] <= 1
    assert f"mean Dice {flips['dice_with']:.3f} with" in table


def test_a_table_of_several_structures_gives_each_ones_dice_and_hd95():
    per = {"dice": 0.8, "iou": 0.7, "hd95": 2.0, "sensitivity": 0.8, "specificity": 0.99,
           "dice/Anterior": 0.81, "hd95/Anterior": 1.5, "dice/Posterior": 0.79,
           "hd95/Posterior": None}
    report = {"machine": "m", "precision": "float32", "rounds": 1, "local_epochs": 1,
              "epochs_per_site": 1, "settings": {"structures": "Anterior,Posterior"},
              "results": {"pooled": {"sites": {"a": per}, "seconds": 1.0}}}
    table = server.bench.markdown(report)
    assert "| method | site | Dice Anterior | HD95 Anterior (mm) | Dice Posterior |" in table
    assert "| pooled | a | 0.810 | 1.500 | 0.790 | n/a |" in table


def test_sites_naming_different_structures_are_not_compared_as_one(tmp_path, caplog):
    """A run that names no structure learns each site's one structure as the
    same class: a 'membrane' site beside a 'vessel' site would make every row
    of the table a comparison of two tasks."""
    sites = [
        Site("dark", _site(tmp_path, "dark", {"0": "membrane", "255": "background"}, 0, 255)),
        Site("plain", _site(tmp_path, "plain", {"0": "background", "1": "vessel"}, 1, 0)),
    ]
    settings = RunSettings.from_run_config({})
    try:
        server.bench.structures_scored(sites, settings)
    except server.bench.ConfigError as exc:
        assert "dark 'membrane'; plain 'vessel'" in str(exc) and "structures=NAME" in str(exc)
    else:
        raise AssertionError("two structures were compared as one")
    same = [sites[0], Site("plain", _site(tmp_path / "2", "plain",
                                           {"0": "background", "1": "Membrane"}, 1, 0))]
    assert server.bench.structures_scored(same, settings) == {
        "dark": "membrane = value 0", "plain": "Membrane = value 1"}
    bare = tmp_path / "bare"  # no label map: the non-zero values, named nothing
    bare.mkdir()
    assert server.bench.structures_scored([sites[0], Site("bare", bare)], settings) == {
        "dark": "membrane = value 0", "bare": "foreground = any value but 0 (no label map)"}
    assert "bare have no label map: their non-zero values are scored as the membrane" in (
        caplog.text)


def test_baselines_side_by_side_train_the_models_they_train_one_after_another(tmp_path):
    """``--baseline-jobs``: local-only and pooled trained in worker processes
    side by side give the same models and scores as in this process, at the
    same threads; the report says they overlapped and its total is the
    table's own wall time, not the sum of overlapping ones."""
    sites = [Site(name, _site(tmp_path, name, {"0": "background", "1": "membrane"}, 1, 0))
             for name in ("a", "b")]
    overrides = {"model-channels": "8,16", "patch-size": 16, "batch-size": 4,
                 "structures": "membrane", "evaluate-every": 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker of two on this machine's cores
    try:
        alone = server.bench.quality(sites, tmp_path / "alone", overrides, rounds=2,
                                     local_epochs=1, methods=("local", "pooled"))
    finally:
        torch.set_num_threads(threads)
    began = time.perf_counter()
    side = server.bench.quality(sites, tmp_path / "side", overrides, rounds=2, local_epochs=1,
                                methods=("local", "pooled"), baseline_jobs=2)
    elapsed = time.perf_counter() - began
    assert alone["baselines"] == {"processes": 1, "threads": None}
    assert side["baselines"]["processes"] == 2
    for method in ("local", "pooled"):
        for site in ("a", "b"):
            assert side["results"][method]["sites"][site] == pytest.approx(
                alone["results"][method]["sites"][site], abs=1e-6, nan_ok=True)
    for kept in ("pooled", "local/a", "local/b"):
        one, two = (load_model(tmp_path / run / kept / "final_model.pt").model.state_dict()
                    for run in ("alone", "side"))
        assert all(torch.allclose(v, two[k], atol=1e-6) for k, v in one.items())
    assert side["test_time_flips"]["dice_with"] == pytest.approx(
        alone["test_time_flips"]["dice_with"], abs=1e-6)
    table = (tmp_path / "side" / "quality.md").read_text()
    assert "trained side by side in 2 processes of" in table
    assert f"Total wall time: {side['seconds'] / 60:.1f} min." in table
    # the table's own clock: it holds each method's time, and the call held it
    assert max(r["seconds"] for r in side["results"].values()) <= side["seconds"] <= elapsed


def test_the_baselines_share_the_cpu_cores_and_leave_a_gpu_to_one():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    workers = server.bench.baseline_workers
    assert workers(None, 4, cpu, cores=2) == (2, 1)  # pooled + 3 local-only models
    assert workers(None, 4, cpu, cores=16) == (4, 4)
    assert workers(None, 1, cpu, cores=16) == (1, None)  # --methods pooled: in this process
    assert workers(None, 4, cuda, cores=16) == (1, None)
    assert workers(1, 4, cpu, cores=16) == (1, None)
    assert workers(3, 4, cpu, cores=2) == (3, 1)


class _DiesWhenUnpickled:
    """In a worker's hands, ends that worker at once, as the kernel's
    out-of-memory killer would."""

    def __reduce__(self):
        import os

        return os._exit, (3,)


def test_a_baseline_worker_that_dies_is_said_with_the_way_round_it(tmp_path):
    settings = RunSettings.from_run_config({"model-channels": "8,16"})
    job = server.bench.BaselineJob("local", "a", settings, [_DiesWhenUnpickled()], {},
                                   tmp_path / "a.pt", None)
    with pytest.raises(server.bench.FedsegError, match="--baseline-jobs 1 trains them"):
        server.bench.run_baselines([job, job], workers=2)
