"""The app bundle that every hospital receives carries only the app's code."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_bundle_holds_the_app_and_nothing_from_around_it(tmp_path):
    """Built (with Flower's own `flwr build`) from a checkout that also holds a
    state folder, a site's data, keys, runs and caches."""
    app = tmp_path / "checkout"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (app / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, app / name)
    planted = {
        "federation/hospitals.json": '{"hospital-a": {"node_id": "1"}}',
        "federation/flwr/config.toml": "[superlink]",
        "federation/runs/r1/metrics.jsonl": '{"round": 1}',
        "federation/runs/r1/summary.json": "{}",
        "data/site-a/dataset.json": '{"training": [{"image": "imagesTr/DOE_JANE"}]}',
        "data/site-a/notes.md": "patient notes",
        "certs/hospitals/a/a.key": "PRIVATE",
        "certs/superlink/server.key": "PRIVATE",
        "runs/demo/metrics.jsonl": "{}",
        ".fedseg/demo-data/hospital-0/dataset.json": "{}",
        "deploy/extra.yaml": "x: 1",
    }
    for name, text in planted.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text)
    out = subprocess.run([str(Path(sys.executable).parent / "flwr"), "build", "--app",
                          str(app)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    fab = next(tmp_path.glob("*.fab"))
    names = zipfile.ZipFile(fab).namelist()
    assert "server/app.py" in names and "client/app.py" in names and "common/config.py" in names
    content = [n for n in names if not n.startswith(".info/") and n != "pyproject.toml"]
    assert all(n.endswith(".py") and n.split("/")[0] in ("client", "common", "server")
               for n in content), sorted(content)
    assert not any(n.startswith(("tests/", "docs/", "deploy/")) for n in names)
