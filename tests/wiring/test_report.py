"""``report.html`` of a real run (the real ServerApp and ClientApp on the
in-process grid), opened in a real browser: headless Chromium from the OS
packages renders its plots and tables."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.grid import federation, run_server

TINY = {"model-channels": "8,16", "patch-size": 32, "batch-size": 2, "patches-per-image": 1,
        "num-rounds": 2, "min-nodes": 2, "test-time-flips": False, "mixed-precision": False}


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium on this machine (apt-get install chromium; .ci/run does)")


def test_the_run_report_renders_in_a_real_browser(synthetic_sites, tmp_path, tmp_path_factory):
    chromium = browser()
    broken = tmp_path_factory.mktemp("broken")
    (broken / "imagesTr").mkdir()
    (broken / "labelsTr").mkdir()
    (broken / "imagesTr" / "x.nii.gz").write_bytes(b"not a nifti")
    (broken / "labelsTr" / "x.nii.gz").write_bytes(b"not a nifti")
    sites = [("hospital-a", synthetic_sites[0]), ("hospital-b", synthetic_sites[1]),
             ("hospital-x", broken)]
    run_server(federation(sites, {**TINY, "run-name": "shown"}), tmp_path)
    report = tmp_path / "shown" / "report.html"
    assert "http" not in report.read_text().split("<body>")[0]  # nothing from the network
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom",
                          report.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-plots-ok="3/3"' in dom, dom[-2000:]  # every plot decoded and shown
    for table in ("final", "rounds", "privacy", "harmonisation", "settings"):
        assert f'<table id="{table}"' in dom
    assert "from the fingerprints of</th><td class=\"l\">2 sites" in dom  # x's failed
    assert "CT intensities" in dom  # the synthetic hospitals' DICOM series are CT
    assert "hospital-a" in dom and "train at hospital-x: fedseg data error" in dom
    assert "site hospital-x failed every round" in dom
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1200,1600", f"--screenshot={shot}",
                    report.as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000  # a page, not a blank


def test_a_run_of_several_structures_shows_a_table_per_structure(tmp_path):
    """The final table's headline, then each structure per site and across
    sites (a hand-made summary: the run behind it is tests/wiring/test_structures.py's)."""
    from common.wire import SCORES, structure_key
    from server.report import write_report

    chromium = browser()
    scores = {k: 0.5 for k in SCORES} | {structure_key(k, s): v for s, v in
                                         (("liver", 0.75), ("lesion", 0.25)) for k in SCORES}
    summary = {"rounds_completed": 1, "structures": ["liver", "lesion"],
               "final": {"round": 1, "sites": {"hospital-a": {"num-examples": 2, **scores}},
                         "overall": scores}, "privacy": {}}
    history = [{"round": 1, "dice": {"hospital-a": 0.5}, "dice_mean": 0.5, "seconds": 1.0}]
    report = write_report(tmp_path, "two", {"num-rounds": 1}, history, summary)
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          report.as_uri()], capture_output=True, text=True, timeout=120).stdout
    rows = dom.split('<table id="structures">')[1].split("</table>")[0].split("<tr>")[1:]
    assert len(rows) == 1 + 2 * 2  # headers; per structure (in class order) its site, all
    assert "liver" in rows[1] and rows[1].count("<td>0.750</td>") == 5
    assert "lesion" in rows[4] and rows[4].count("<th>0.250</th>") == 5


def dump_dom(chromium: str, report, profile) -> str:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                           f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                           "--dump-dom", report.as_uri()],
                          capture_output=True, text=True, timeout=120).stdout


def test_a_run_that_never_aggregated_says_it_failed_and_why_at_the_top(tmp_path):
    """A real run folder (server/runs.py) whose only round was not aggregated:
    the page opens with the failure and its cause, has no final figures to
    show and says no final model was written."""
    from common.config import RunSettings
    from server.runs import RunFolder
    from tests.unit.test_runs import CFG, arrays, round_record

    chromium = browser()
    run = RunFolder.open(tmp_path, RunSettings.from_run_config({**CFG, "num-rounds": 1}))
    rec = round_record(0.5, 0.9)
    rec.aggregated = False
    rec.evaluate = {}
    rec.failures.append("round skipped: 1 of the 2 sites needed (min-nodes) answered round 1;"
                        " the model is unchanged")
    run.record_round(1, arrays(1), rec)
    run.finish(None, stopped="too few sites: 1 of the 2 sites needed answered round 1")
    dom = dump_dom(chromium, tmp_path / "r1" / "report.html", tmp_path / "profile")
    top = dom.split("<h2>")[0]  # before the first section
    assert "<strong>failed</strong>" in top and "no round aggregated an update" in top
    assert "too few sites" in top and "no final model written" in top
    assert "round None" not in dom and "finished: 1 of 1" not in dom
    assert "no round was scored at any site" in dom


def test_a_finished_runs_report_has_its_date_version_model_hash_units_and_readable_names(
        tmp_path):
    import hashlib

    from common.config import RunSettings
    from common.inference import fedseg_version
    from server.runs import RunFolder
    from tests.unit.test_runs import CFG, arrays, round_record

    chromium = browser()
    run = RunFolder.open(tmp_path, RunSettings.from_run_config({**CFG, "num-rounds": 2}))
    run.record_round(1, arrays(1), round_record(0.2, 0.6))
    run.record_round(2, arrays(2), round_record(0.5, 0.9))
    summary = run.finish(None)
    dom = dump_dom(chromium, tmp_path / "r1" / "report.html", tmp_path / "profile")
    top = dom.split("<h2>")[0]
    digest = hashlib.sha256((tmp_path / "r1" / "final_model.pt").read_bytes()).hexdigest()
    assert "<strong>finished</strong>: 2 of 2 rounds" in top
    assert digest in top and f"fedseg {fedseg_version()}" in top
    assert summary["finished_at"][:10] in top  # the date
    final = dom.split('<table id="final">')[1].split("</table>")[0]
    assert "HD95 (mm)" in final and "scores of the final round, round 2" in dom
    assert "<td>0.900</td>" in final  # b's Dice of round 2 (round 1 had 0.600)
    privacy = dom.split('<table id="privacy">')[1].split("</table>")[0]
    assert "noise multiplier" in privacy and "secure aggregation" in privacy
    assert "noise_multiplier" not in privacy and "max_epsilon" not in privacy
