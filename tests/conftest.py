"""Shared fixtures: real data from ../shared (skipped when absent), synthetic sites."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEDSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))

# Keep everything the tests write inside the project (Flower's home, Ray, caches).
os.environ.setdefault("FEDSEG_HOME", str(ROOT / ".fedseg"))
os.environ.setdefault("MPLCONFIGDIR", str(Path(os.environ["FEDSEG_HOME"]) / "matplotlib"))
os.environ.setdefault("FLWR_HOME", str(Path(os.environ["FEDSEG_HOME"]) / "flwr"))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      str(Path(os.environ["FEDSEG_HOME"]) / "torchinductor"))


def _shared(sub: str) -> Path:
    path = SHARED / sub
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    return _shared("dicom")


@pytest.fixture(scope="session")
def retina_dir() -> Path:
    return _shared("retina")


@pytest.fixture(scope="session")
def synthetic_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small synthetic hospitals (DICOM series; SEG and NIfTI labels)."""
    from common.data.synthetic import write_federation

    return write_federation(tmp_path_factory.mktemp("synthetic"), 3, n_train=4, n_test=2)


@pytest.fixture
def task_identity():
    """Flower builds Messages only inside a task: give the test one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None
