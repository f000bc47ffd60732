"""The CLI: bad settings refused before anything starts, naming the key; the
hospital's commands live apart from the coordinator's."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.simulation import APP_DIR


def fedseg(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=APP_DIR,
                          env={**os.environ, "COLUMNS": "250"})  # tables not wrapped


@pytest.mark.parametrize(("args", "says"), [
    (["--config", "learning-rat=0.5"], "did you mean 'learning-rate'"),
    (["--config", "local-epochs=abc"], "'local-epochs' must be an integer"),
    (["--node-config", "devic=cpu"], "unknown node setting 'devic'"),
    (["--node-config", "data-dir=/srv"], "set by the simulation itself"),
    (["--config", "rounds"], "--config takes KEY=VALUE"),
])
def test_simulate_refuses_bad_settings_at_once(tmp_path, args, says):
    start = time.monotonic()
    proc = fedseg("simulate", str(tmp_path), *args, "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert says in " ".join(proc.stdout.split())
    assert time.monotonic() - start < 30  # measured 0.2 s; nothing started
    assert not (tmp_path / "run").exists()


def test_simulate_refuses_a_structure_a_sites_label_map_lacks_at_once(tmp_path, monkeypatch,
                                                                      capsys):
    """Each site folder's label map is read against the run's structures
    before anything starts, as each site would read it after: where no site
    could train, the command stops (exit 2) naming each folder. Where another
    can, the run goes on without the one that cannot, named at once (the real
    run of that: tests/federation/test_label_maps.py)."""
    import json

    import server.cli

    started = []
    monkeypatch.setattr(server.cli, "_run", lambda sites, *a, **k: started.append(sites) or {
        "rounds_completed": 1, "rounds_planned": 1})

    def site(name: str, labels: dict[str, str]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "dataset.json").write_text(json.dumps({"labels": labels, "training": []}))
        return folder

    both = site("site-1", {"0": "background", "1": "Anterior", "2": "Posterior"})
    none = site("site-2", {"0": "background"})
    one = site("site-3", {"0": "background", "1": "Anterior", "2": "Nope"})

    def simulate(*folders: Path) -> tuple[int, str]:
        code = server.cli.main(["simulate", *map(str, folders), "--config",
                                "structures=Anterior,Posterior", "--out", str(tmp_path / "run")])
        return code, " ".join(capsys.readouterr().out.split())

    code, said = simulate(none, one)
    assert code == 2 and not started, said
    assert f"site folder {none}: the site's label map has no 'Anterior'" in said, said
    assert f"site folder {one}: the site's label map has no 'Posterior'" in said, said
    code, said = simulate(both, one)
    assert code == 0 and len(started) == 1, said
    assert f"note: site folder {one}: the site's label map has no 'Posterior'" in said, said
    assert str(both) not in said


def test_simulate_refuses_two_site_folders_of_one_name_and_says_how_to_name_them(
        tmp_path, monkeypatch, capsys):
    """hippo3/site-1 and hippo3-skewed/site-1 would both be 'site-1' (scores and
    kept models go by a site's name): refused at once, naming both folders and
    --names; with --names they run."""
    import server.cli

    started = []
    monkeypatch.setattr(server.cli, "_run", lambda sites, *a, **k: started.append(sites) or {
        "rounds_completed": 1, "rounds_planned": 1})
    monkeypatch.setattr(server.cli, "_check_label_maps", lambda *a, **k: None)
    a, b = tmp_path / "even" / "site-1", tmp_path / "skewed" / "site-1"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    code = server.cli.main(["simulate", str(a), str(b), "--out", str(tmp_path / "run")])
    said = " ".join(capsys.readouterr().out.split())
    assert code == 2 and not started, said
    assert f"site-1: {a}, {b}" in said and "--names" in said, said
    code = server.cli.main(["simulate", str(a), str(b), "--names", "even-1,skewed-1",
                            "--out", str(tmp_path / "run")])
    assert code == 0 and [s.name for s in started[0]] == ["even-1", "skewed-1"]


def test_run_and_bench_refuse_a_mistyped_key(tmp_path):
    for cmd in (["run", "--state", str(tmp_path / "fed")], ["bench", "quality", str(tmp_path)],
                ["demo"]):
        proc = fedseg(*cmd, "--config", "num-round=3")
        assert proc.returncode == 2, cmd
        assert "did you mean 'num-rounds'" in " ".join(proc.stdout.split()), cmd
    assert not (tmp_path / "fed").exists()


def test_bench_checks_typed_settings_with_its_preset_beneath(tmp_path):
    """A 24-voxel patch fits the hippocampus preset's U-Net once it is given
    4 levels (a multiple of 8), not the preset's 5: the check sees the preset
    beneath the typed settings, and refuses what the U-Net cannot take."""
    missing = str(tmp_path / "no-site")
    fits = fedseg("bench", "quality", missing, "--preset", "hippocampus",
                  "--config", "patch-size=24", "--config", "model-channels=16,32,64,128")
    assert fits.returncode == 2
    assert "site folder(s) not found" in fits.stdout, fits.stdout + fits.stderr
    odd = fedseg("bench", "quality", missing, "--preset", "hippocampus",
                 "--config", "patch-size=24")
    assert odd.returncode == 2
    assert "patch-size must be a multiple of 16 for 5 U-Net levels, got 24" in " ".join(
        odd.stdout.split())


def test_simulate_starts_from_a_preset_with_typed_settings_over_it(tmp_path, monkeypatch):
    """``fedseg simulate --preset hippocampus``: the benchmark's measured 3D
    settings reach the run, what is typed goes over them, and a typed value
    the preset's U-Net cannot take is refused before anything starts."""
    import server.cli

    seen = {}

    def run(sites, run_dir, overrides, **_):  # the wiring only: what the run is given
        seen.update(overrides)
        return {"rounds_completed": 1, "rounds_planned": 1}

    monkeypatch.setattr(server.cli, "_run", run)
    site = tmp_path / "site-1"
    site.mkdir()  # its label map names the preset's structures, read before the run
    (site / "dataset.json").write_text(
        '{"labels": {"0": "background", "1": "Anterior", "2": "Posterior"}, "training": []}')
    assert server.cli.main(["simulate", str(site), "--preset", "hippocampus",
                            "--rounds", "3", "--config", "patch-size=48"]) == 0
    assert (seen["model-spatial-dims"], seen["model-channels"], seen["num-rounds"],
            seen["patch-size"], seen["patches-per-image"]) == (3, "8,16,32,64,128", 3, 48, 1)
    seen.clear()
    assert server.cli.main(["simulate", str(site), "--preset", "hippocampus",
                            "--config", "patch-size=24"]) == 2 and not seen


def test_the_hospitals_commands_live_apart_from_the_coordinators():
    import client.cli
    import server.cli

    assert not hasattr(server.cli, "cmd_node") and not hasattr(server.cli, "cmd_keygen")
    assert hasattr(client.cli, "cmd_node") and hasattr(client.cli, "cmd_keygen")
    proc = fedseg("node", "--superlink", "127.0.0.1:1", "--data-dir", "/nonexistent",
                  "--name", "h", "--device", "gpu", "--insecure")
    assert proc.returncode == 2
    assert "node setting 'device' must be auto, cpu or cuda[:N]" in " ".join(proc.stdout.split())


def labels_removed(site: Path, into: Path) -> Path:
    """A copy of a synthetic site whose training images have no labels."""
    import shutil

    copy = Path(shutil.copytree(site, into))
    if (copy / "dataset.json").exists():
        (copy / "dataset.json").unlink()  # pair by folder names, then drop the labels
    shutil.rmtree(copy / "labelsTr")
    return copy


def test_site_check_lists_every_case_and_exits_by_whether_the_site_can_join(
        tmp_path, synthetic_sites):
    good = fedseg("site", "check", str(synthetic_sites[0]))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "4 of 4 training cases usable; 2 of 2 test cases usable" in " ".join(
        good.stdout.split())
    bad = labels_removed(synthetic_sites[0], tmp_path / "nolabels")
    proc = fedseg("site", "check", str(bad))
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 1
    assert "0 of 4 training cases usable (4 left out)" in out
    assert out.count("no label file for this image") == 4 and "cannot join" in out


def test_a_node_on_a_folder_without_labels_is_refused_at_start_with_the_reason(
        tmp_path, synthetic_sites):
    bad = labels_removed(synthetic_sites[1], tmp_path / "nolabels")
    start = time.monotonic()
    proc = fedseg("node", "--superlink", "127.0.0.1:1", "--data-dir", str(bad), "--name", "h",
                  "--insecure", "--state", str(tmp_path / "state"))
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0
    assert "has no usable training case, so this node does not join" in out
    assert "no label file for this image" in out
    assert "fedseg site check" in out and "cannot reach" not in out  # before any connection
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_bench_patches_measures_2d_and_3d_side_by_side():
    proc = fedseg("bench", "patches", "--models", "2:16,3:16", "--steps", "1", "--volume",
                  "16,16,16", "--config", "model-channels=4,8", "--device", "cpu",
                  timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| 2D", "| 3D"))]
    assert [r.split("|")[1:3] for r in rows] == [[" 2D ", " 16 "], [" 3D ", " 16 "]]
    assert all(float(r.split("|")[4]) > 0 for r in rows)  # seconds per step


def test_synth_writes_several_structures_and_refuses_what_cannot_be(tmp_path):
    proc = fedseg("synth", str(tmp_path / "rt"), "--sites", "1", "--train", "1", "--test",
                  "1", "--structures", "organ,lesion", "--labels", "rtstruct")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"1": "organ"' in (tmp_path / "rt" / "hospital-0" / "dataset.json").read_text()
    for args, says in ((("--structures", "a", "--images", "png", "--labels", "seg"),
                        "png images cannot have seg labels"),
                       (("--labels", "rtstruct"), "go with --structures"),
                       (("--structures", "a,b,c,d"), "1 to 3 structures")):
        proc = fedseg("synth", str(tmp_path / "x"), *args)
        assert proc.returncode == 2 and says in proc.stdout + proc.stderr, (args, proc.stdout)


def test_the_closing_dice_line_says_which_sites_each_figure_is_the_mean_of():
    """With fraction-evaluate below 1 (or a site failing) the first and last
    scored rounds can be means over different sites: the line says so, and
    says nothing of rounds no site scored."""
    from server.cli import dice_progress

    rows = [{"round": 1, "dice": {}, "dice_mean": None},
            {"round": 2, "dice": {"a": 0.2, "b": 0.4}, "dice_mean": 0.3},
            {"round": 3, "dice": {}, "dice_mean": None},
            {"round": 4, "dice": {"a": 0.5, "b": 0.7, "c": 0.6}, "dice_mean": 0.6}]
    assert dice_progress(rows) == ("Dice: round 2 0.300 (2 sites) -> round 4 0.600 "
                                   "(3 sites, not the same sites)")
    rows[1]["dice"]["c"] = 0.3
    assert dice_progress(rows).endswith("round 4 0.600 (3 sites)")
    assert dice_progress(rows[:1]) == "Dice: no round was scored"
    assert dice_progress(rows[3:]) == "Dice: round 4 0.600 (3 sites)"


def test_after_a_resume_the_closing_lines_count_only_the_resumed_part(tmp_path, capsys):
    """The worker log and metrics of a resumed run hold both parts: the round
    times and the process count are the part that just ran (rounds 3-6, its
    own two processes), not the sum of both."""
    import json

    from server.render import workers_line
    from server.simulation import WORKERS_LOG, worker_summary

    def line(t: float, pid: int, rss: float) -> str:
        return json.dumps({"time": t, "pid": pid, "host": "h", "ray_node": "n", "site": "a",
                           "sites_held_peak": 1, "peak_rss_mb": rss})

    (tmp_path / WORKERS_LOG).write_text("\n".join(
        [line(100.0, 1, 900), line(101.0, 2, 950), line(200.0, 3, 500), line(201.0, 4, 510)])
        + "\n")
    part = worker_summary(tmp_path, since=150.0)
    assert part["processes"] == 2 and list(part["peak_rss_mb"].values()) == [500, 510]
    assert worker_summary(tmp_path)["processes"] == 4  # the whole log, for the record
    rows = [{"round": r, "seconds": s} for r, s in ((3, 9.0), (4, 2.0), (5, 3.0), (6, 7.0))]
    workers_line(part, rows)
    said = " ".join(capsys.readouterr().out.split())
    assert "median 2.5 s (rounds 4-5); round 3 9.0 s (first reads" in said
    assert "ran in 2 process(es)" in said and "500-510 MB" in said


def test_round_lines_and_the_final_table_count_sites_in_order_and_say_what_is_missing(
        capsys):
    """Sites as a person counts them (site-2 before site-10); a round no site
    scored, a run that scored no round and a run too short for a median round
    time each say so instead of printing 'None' or empty brackets."""
    from rich.console import Console

    from server.render import round_line, summary_table, workers_line

    row = {"round": 1, "dice": {"site-10": 0.5, "site-2": 0.6, "site-1": 0.7},
           "dice_mean": 0.6, "train_loss": 0.3, "seconds": 2.0, "failures": []}
    round_line(row)
    said = " ".join(capsys.readouterr().out.split())
    assert "(site-1 0.700 site-2 0.600 site-10 0.500)" in said, said
    round_line({**row, "dice": {}, "dice_mean": None})
    said = " ".join(capsys.readouterr().out.split())
    assert "(not scored this round)" in said and "()" not in said, said
    summary = {"run": "r", "structures": [], "rounds_completed": 0,
               "final": {"round": None, "sites": {}, "overall": {}},
               "participation": {"site-10": {"rounds_trained": 0},
                                 "site-2": {"rounds_trained": 0}}}
    out = Console(width=200, record=True)
    out.print(summary_table(summary))
    text = out.export_text()
    assert "no round was scored" in text and "None" not in text, text
    assert text.index("site-2") < text.index("site-10")
    workers_line(None, [{"round": 1, "seconds": 9.0}, {"round": 2, "seconds": 3.0}])
    said = " ".join(capsys.readouterr().out.split())
    assert "round 1 9.0 s, round 2 3.0 s" in said and "median needs 3 rounds" in said, said
