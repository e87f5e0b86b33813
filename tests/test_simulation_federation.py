"""Real Flower simulations: mixed ranks with hostile and failing clients, bfloat16 wire."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from local_grid import crash, nan_update, wrapped_client_app

from common.adapter import get_adapter_arrays, payload_bytes
from common.config import ModelConfig, RunConfig
from common.model import build_lora_model
from simulations.run import prepare_run, simulate

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent


def test_mixed_ranks_with_hostile_and_failing_clients(tmp_path, data_dir, monkeypatch):
    # Ray's worker processes import the tampering behaviours from this folder.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    )
    cfg = prepare_run(
        RunConfig.from_dict(
            {
                "seed": 0,
                "output": str(tmp_path / "run"),
                "model": {"client-ranks": "4,8,16"},
                "data": {
                    "data-dir": str(data_dir),
                    "num-clients": 4,
                    "max-examples-per-client": 16,
                },
                "train": {"batch-size": 8, "local-epochs": 0.5},
                "privacy": {"accountant": "rdp"},
                "server": {"num-rounds": 1, "eval-every": 0, "wire-dtype": "float16"},
            }
        )
    )
    # Partition ranks round-robin: 0 -> 4, 1 -> 8, 2 -> 16 (sends NaN), 3 -> 4 (crashes).
    app = wrapped_client_app(cfg, {2: nan_update, 3: crash})
    run_dir = simulate(cfg, client_app=app)

    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["num_sampled"] == 4
    assert row["num_accepted"] == 2
    assert row["num_rejected"] == 1
    assert row["num_failed"] == 1
    assert row["aggregated"] is True

    # float16 adapters of each client's own rank went down; ranks 4, 8, 16 came back up.
    rank_four = payload_bytes(get_adapter_arrays(build_lora_model(ModelConfig(lora_r=4))))
    per_rank_float16 = rank_four // 4 // 2
    assert row["bytes_down"] == per_rank_float16 * (4 + 8 + 16 + 4)
    assert row["bytes_up"] == per_rank_float16 * (4 + 8 + 16)

    adapter_config = json.loads((run_dir / "global_adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 16
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert sorted(privacy["clients"]) == ["client-000", "client-001", "client-002"]


def test_bfloat16_wire_simulation_halves_bytes(tmp_path, data_dir):
    cfg = prepare_run(
        RunConfig.from_dict(
            {
                "seed": 0,
                "output": str(tmp_path / "run"),
                "data": {
                    "data-dir": str(data_dir),
                    "num-clients": 2,
                    "max-examples-per-client": 16,
                },
                "train": {"batch-size": 8, "local-epochs": 0.5},
                "privacy": {"accountant": "rdp"},
                "server": {"num-rounds": 2, "eval-every": 0, "wire-dtype": "bfloat16"},
            }
        )
    )
    run_dir = simulate(cfg)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    float32_bytes = payload_bytes(get_adapter_arrays(build_lora_model(ModelConfig(lora_r=4))))
    for row in rows:
        assert row["num_accepted"] == 2
        assert row["aggregated"] is True
        # Each of the two clients received and sent 2 bytes per adapter value instead of 4.
        assert row["bytes_down"] * 2 == 2 * float32_bytes
        assert row["bytes_up"] * 2 == 2 * float32_bytes
    assert rows[1]["train_loss"] is not None
    assert (run_dir / "global_adapter" / "adapter_model.safetensors").is_file()
