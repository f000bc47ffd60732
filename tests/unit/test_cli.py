"""The CLI: bad settings refused before anything starts, naming the key; the
hospital's commands live apart from the coordinator's."""

import subprocess
import sys
import time

import pytest

from server.simulation import APP_DIR


def fedseg(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=APP_DIR)


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


def test_run_and_bench_refuse_a_mistyped_key(tmp_path):
    for cmd in (["run", "--state", str(tmp_path / "fed")], ["bench", "quality", str(tmp_path)],
                ["demo"]):
        proc = fedseg(*cmd, "--config", "num-round=3")
        assert proc.returncode == 2, cmd
        assert "did you mean 'num-rounds'" in " ".join(proc.stdout.split()), cmd
    assert not (tmp_path / "fed").exists()


def test_the_hospitals_commands_live_apart_from_the_coordinators():
    import client.cli
    import server.cli

    assert not hasattr(server.cli, "cmd_node") and not hasattr(server.cli, "cmd_keygen")
    assert hasattr(client.cli, "cmd_node") and hasattr(client.cli, "cmd_keygen")
    proc = fedseg("node", "--superlink", "127.0.0.1:1", "--data-dir", "/nonexistent",
                  "--name", "h", "--device", "gpu", "--insecure")
    assert proc.returncode == 2
    assert "node setting 'device' must be auto, cpu or cuda[:N]" in " ".join(proc.stdout.split())
