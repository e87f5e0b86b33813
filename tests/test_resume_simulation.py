"""`fedads simulate` killed after round 1 and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent

# FedAdam and FFA-LoRA make the optimizer state and the frozen lora_A part of what has to
# survive the restart; DP noise comes from seeded generators (secure mode is off).
CONFIG = """\
seed = 0
[model]
ffa-lora = true
[train]
batch-size = 8
local-epochs = 0.5
[privacy]
accountant = "rdp"
[server]
eval-every = 0
strategy = "fedadam"
"""


def simulate_args(config: Path, data_dir: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "common.cli", "simulate",
        "--config", str(config),
        "--data-dir", str(data_dir),
        "--output", str(run_dir),
        "--num-rounds", "3",
        "--num-clients", "2",
        "--max-examples-per-client", "16",
    ]  # fmt: skip


def run_fedads(args: list[str]) -> None:
    result = subprocess.run(
        args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args[3:5])} failed:\n{result.stderr[-4000:]}")


def completed_rounds(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["round"] for line in path.read_text().splitlines() if line.strip()]


def kill_after_first_round(args: list[str], run_dir: Path) -> None:
    """Start ``args`` in its own session and SIGKILL the session once round 1 is checkpointed.

    The loop appends a round's metrics line before it writes the round's checkpoint, so
    the metrics line alone may come before there is anything to resume from.
    """
    log = run_dir.with_name(run_dir.name + ".log")
    with log.open("w") as handle:
        proc = subprocess.Popen(
            args, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 900
            checkpoint = run_dir / "checkpoint" / "state.json"
            while 1 not in completed_rounds(run_dir) or not checkpoint.exists():
                assert proc.poll() is None, f"simulation ended early:\n{log.read_text()[-4000:]}"
                assert time.monotonic() < deadline, "round 1 did not finish in 900 s"
                time.sleep(0.2)
            assert proc.poll() is None, "simulation finished before it could be killed"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the simulation and its Ray workers
            proc.wait()


def test_killed_run_resumes_to_uninterrupted_result(tmp_path, data_dir):
    config = tmp_path / "config.toml"
    config.write_text(CONFIG, encoding="utf-8")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_fedads(simulate_args(config, data_dir, straight))

    kill_after_first_round(simulate_args(config, data_dir, killed), killed)
    assert completed_rounds(killed)[0] == 1
    assert len(completed_rounds(killed)) < 3
    run_fedads([sys.executable, "-m", "common.cli", "simulate", "--resume", str(killed)])

    # No round lost or done twice, and the same global adapter.
    assert completed_rounds(killed) == [1, 2, 3]
    expected = load_file(straight / "global_adapter" / "adapter_model.safetensors")
    resumed = load_file(killed / "global_adapter" / "adapter_model.safetensors")
    assert set(resumed) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name])

    # Each client spent exactly three rounds of ε: a round cut short by the kill and
    # asked again was re-sent from the client's stored release, not trained twice.
    for client_id in ("client-000", "client-001"):
        ledger = json.loads((killed / "ledgers" / f"{client_id}.json").read_text())
        reference = json.loads((straight / "ledgers" / f"{client_id}.json").read_text())
        assert ledger["rounds_joined"] == [1, 2, 3]
        assert len(ledger["events"]) == 3
        assert ledger["epsilon"] == pytest.approx(reference["epsilon"])
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert all(row["num_failed"] == 0 and row["num_accepted"] == 2 for row in rows)
