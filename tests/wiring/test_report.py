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
    for table in ("final", "rounds", "privacy", "settings"):
        assert f'<table id="{table}"' in dom
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
