"""Real Flower simulations (SuperLink in simulation mode, Ray, the real apps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from common.data.synthetic import write_federation
from server.processes import free_port
from server.runs import read_metrics
from server.simulation import APP_DIR, Site, runtime_env
from tests.federation.conftest import processes_matching, stop_pids

pytestmark = pytest.mark.federation



@pytest.fixture(scope="module")
def two_sites(tmp_path_factory) -> list[Site]:
    folders = write_federation(tmp_path_factory.mktemp("fed"), 2, n_train=4, n_test=2, seed=1)
    return [Site(f"site-{i}", f) for i, f in enumerate(folders)]


@pytest.mark.slow  # 109 s (three runs of the default 2D U-Net): with the drills, so the
# default suite stays under 8 min; test_the_deployment_gives_what_the_simulation_gives and
# the next test keep a real simulation in it
def test_fedseg_simulate_command_trains_and_resumes(two_sites, tmp_path,
                                                    no_leftover_processes):
    """The real command end to end: every site reports every round with every
    metric; a second run into the folder is refused; --resume continues it."""
    out = tmp_path / "cli-run"
    cmd = [sys.executable, "-m", "server.cli", "simulate",
           *(str(s.data_dir) for s in two_sites), "--names", "site-0,site-1",
           "--rounds", "2", "--out", str(out), "--config", "local-epochs=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=APP_DIR,
                          env=runtime_env(1))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "round   1" in proc.stdout and "round   2" in proc.stdout
    rows = read_metrics(out)
    for row in rows:  # every site reported every round, with every metric
        assert set(row["dice"]) == {"site-0", "site-1"}
        for site in ("site-0", "site-1"):
            assert set(row["sites"][site]) >= {"dice", "iou", "hd95", "sensitivity",
                                               "specificity", "num-examples"}
            assert row["sites"][site]["num-examples"] == 2
        assert row["failures"] == [] and row["trained"] == ["site-0", "site-1"]
        # one message a round: the model down and up once per site (the last
        # round also sends evaluate messages, weights down only)
        assert row["bytes_up"] > 2 * 6_000_000 and row["bytes_down"] > 2 * 6_000_000
    for name in ("metrics.jsonl", "summary.json", "final_model.pt", "dice.png"):
        assert (out / name).exists(), name
    # a second run into the same folder is refused instead of overwriting it
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=APP_DIR,
                           env=runtime_env(1))
    assert again.returncode == 2 and "--resume" in again.stdout
    # continued to round 3: rounds 1-2 kept, round 3 new
    resumed = subprocess.run([*cmd[:cmd.index("--rounds")], "--rounds", "3", "--resume",
                              str(out)], capture_output=True, text=True, timeout=400,
                             cwd=APP_DIR, env=runtime_env(1))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = read_metrics(out)
    assert [r["round"] for r in after] == [1, 2, 3] and after[:2] == rows
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["problems"] == []
    assert after[-1]["dice_mean"] > after[0]["dice_mean"]  # the global model learned
    # a resume that cannot continue (another U-Net than the checkpoint's) fails, saying
    # why, instead of exiting 0 over the earlier summary still in the folder
    base = cmd[:cmd.index("--rounds")]
    broken = subprocess.run([*base, "--rounds", "4", "--resume", str(out), "--config",
                             "model-channels=8,16"], capture_output=True, text=True,
                            timeout=400, cwd=APP_DIR, env=runtime_env(1))
    said = " ".join((broken.stdout + broken.stderr).split())
    assert broken.returncode != 0 and "did not finish" in said, said
    assert json.loads((out / "summary.json").read_text())["rounds_completed"] == 3
    preset = subprocess.run([*base, "--resume", str(out), "--preset", "hippocampus"],
                            capture_output=True, text=True, timeout=60, cwd=APP_DIR,
                            env=runtime_env(1))
    assert preset.returncode == 2 and "a resumed run keeps its own" in " ".join(
        preset.stdout.split())


@pytest.mark.slow  # 31 s: with the drills, so the default suite keeps a margin under 8 min
def test_flwr_run_against_a_local_simulation_connection(tmp_path, no_leftover_processes):
    """``flwr run .`` as Flower documents it; nodes without data-dir use synthetic sites."""
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    env = runtime_env(1)
    http_port, control_port = free_port(), free_port()
    env.update(FLWR_HOME=str(flwr_home), FEDSEG_RUNS_DIR=str(tmp_path / "runs"),
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
               FLWR_LOCAL_CONTROL_API_PORT=str(control_port))
    env.pop("FEDSEG_SIM_SITES", None)
    cmd = ["flwr", "run", ".", "local", "--stream",
           "--run-config", 'num-rounds=1 run-name="flwr-run" synthetic-train-cases=2 '
                           'synthetic-test-cases=1',
           "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]
    try:
        proc = subprocess.run(cmd, cwd=APP_DIR, env=env, capture_output=True, text=True,
                              timeout=400)
    finally:
        # The :local: connection leaves a detached SuperLink behind: stop it by PID.
        stop_pids(list(processes_matching(str(flwr_home))))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "runs" / "flwr-run")
    assert len(rows) == 1 and set(rows[0]["dice"]) == {"hospital-0", "hospital-1"}
    assert os.path.exists(tmp_path / "runs" / "flwr-run" / "summary.json")


@pytest.mark.slow  # a process drill, with tests/deployment/test_faults.py
def test_sigterm_stops_a_simulation_and_every_process_it_started(two_sites, tmp_path,
                                                                 no_leftover_processes):
    """systemd, ``timeout`` and ``kill`` send SIGTERM: the run stops like Ctrl-C,
    its SuperLink, Ray and app processes with it, and the run folder can be resumed."""
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "server.cli", "simulate",
           *(str(s.data_dir) for s in two_sites), "--rounds", "30", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=APP_DIR, env=runtime_env(1))
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not (
                (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.terminate()
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output[-3000:]
    assert "--resume" in output
    assert len(read_metrics(out)) < 30
