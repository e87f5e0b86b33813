"""Real Flower simulations with secure aggregation on and off give the same global adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow

# Three clients with DP-SGD (seeded noise, so both runs train identical updates) and a
# norm bound that both modes apply: the server in the clear, each client under SecAgg.
# One round: after it, the two global adapters may differ in float32 rounding, and clients
# that train from them in a later round carry that difference into their updates.
CONFIG = """\
seed = 0
[data]
num-clients = 3
max-examples-per-client = 16
[train]
batch-size = 8
local-epochs = 0.5
[privacy]
accountant = "rdp"
[server]
num-rounds = 1
eval-every = 0
norm-bound = 5.0
"""


def simulate(config: Path, data_dir: Path, output: Path, *flags: str) -> Path:
    command = [
        sys.executable, "-m", "common.cli", "simulate",
        "--config", str(config), "--data-dir", str(data_dir), "--output", str(output), *flags,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    if result.returncode != 0:
        raise AssertionError(f"simulate failed:\n{result.stdout}\n{result.stderr[-4000:]}")
    return output


def test_secure_simulation_matches_plain(tmp_path, data_dir):
    config = tmp_path / "config.toml"
    config.write_text(CONFIG, encoding="utf-8")
    plain = simulate(config, data_dir, tmp_path / "plain")
    secure = simulate(config, data_dir, tmp_path / "secure", "--secure-aggregation")

    rows = [json.loads(line) for line in (secure / "metrics.jsonl").read_text().splitlines()]
    assert [row["aggregated"] for row in rows] == [True]
    assert [row["num_accepted"] for row in rows] == [3]
    bound = sum(row["secagg_error_bound"] for row in rows)
    assert 0 < bound < 1e-6

    # Same adapter within the fixed-point bound and float32 rounding of the global state.
    expected = load_file(plain / "global_adapter" / "adapter_model.safetensors")
    found = load_file(secure / "global_adapter" / "adapter_model.safetensors")
    assert set(found) == set(expected)
    moved = 0
    for name, value in expected.items():
        slack = bound + 2 * np.spacing(np.abs(value))
        error = np.abs(found[name].astype(np.float64) - value)
        assert np.all(error <= slack), f"{name}: error {error.max():.3g}"
        moved += int(np.any(value != 0))
    assert moved > 0

    privacy = json.loads((secure / "privacy.json").read_text())
    assert privacy["secure_aggregation"] is True
    assert json.loads((plain / "privacy.json").read_text())["secure_aggregation"] is False
    report = (secure / "report.md").read_text()
    assert "secure aggregation on: per-client validation moved to clients" in report
    for client_id in ("client-000", "client-001", "client-002"):
        assert privacy["clients"][client_id]["rounds_joined"] == [1]
