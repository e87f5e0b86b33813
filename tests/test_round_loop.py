"""The round loop with protocol-speaking test clients: failures, hostile updates, sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from local_grid import LocalGrid, crash, nan_update, synthetic_client_app

from common.config import RunConfig
from server.loop import run_rounds


def loop_config(tmp_path, **server) -> RunConfig:
    return RunConfig.from_dict(
        {
            "seed": 0,
            "output": str(tmp_path),
            "privacy": {"dp": False},
            "server": {"num-rounds": 2, "eval-every": 0, **server},
        }
    )


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def client_of(grid: LocalGrid, message) -> str:
    return f"client-{grid.partitions[message.metadata.dst_node_id]:03d}"


def boosted_update(update, received):
    return {name: received[name] + 100 * (value - received[name]) for name, value in update.items()}


def test_rounds_complete_with_thirty_percent_failing(tmp_path, caplog):
    cfg = loop_config(tmp_path)
    app = synthetic_client_app(cfg, behaviours={4: crash})
    grid = LocalGrid(app, 10, silent={2, 7})
    with caplog.at_level("WARNING"):
        run_rounds(grid, cfg, tmp_path)
    rows = metrics(tmp_path)
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        assert row["num_sampled"] == 10
        assert row["num_failed"] == 3
        assert row["num_accepted"] == 7
        assert row["aggregated"] is True
    assert "client client-004: " in caplog.text
    assert "client crashed" in caplog.text
    assert "client client-002: no reply within the round timeout" in caplog.text
    assert "client client-007: no reply" in caplog.text


def test_hostile_clients_rejected_and_global_unchanged(tmp_path, caplog):
    # Honest steps have L2 norm about 0.01 * sqrt(165888) = 4.1; the x100 one about 410.
    honest_dir, attacked_dir = tmp_path / "honest", tmp_path / "attacked"
    honest_cfg = loop_config(honest_dir, **{"max-update-norm": 20.0})
    attacked_cfg = loop_config(attacked_dir, **{"max-update-norm": 20.0})
    honest = run_rounds(
        LocalGrid(synthetic_client_app(honest_cfg), 5, silent={3, 4}), honest_cfg, honest_dir
    )
    hostile_app = synthetic_client_app(attacked_cfg, behaviours={3: nan_update, 4: boosted_update})
    with caplog.at_level("WARNING"):
        attacked = run_rounds(LocalGrid(hostile_app, 5), attacked_cfg, attacked_dir)

    for row in metrics(attacked_dir):
        assert row["num_trained"] == 5
        assert row["num_rejected"] == 2
        assert row["num_accepted"] == 3
        assert row["num_failed"] == 0
    assert set(honest) == set(attacked)
    for name in honest:
        np.testing.assert_array_equal(attacked[name], honest[name])
    assert "client client-003 (non-finite)" in caplog.text
    assert "client client-004 (norm-bound)" in caplog.text


def test_too_few_updates_keep_global_adapter(tmp_path, caplog):
    cfg = loop_config(tmp_path, **{"num-rounds": 1})
    initial_dir = tmp_path / "initial"
    initial = run_rounds(
        LocalGrid(synthetic_client_app(cfg), 3, silent={0, 1, 2}),
        loop_config(initial_dir, **{"num-rounds": 1}),
        initial_dir,
    )
    with caplog.at_level("WARNING"):
        final = run_rounds(LocalGrid(synthetic_client_app(cfg), 3, silent={0, 1}), cfg, tmp_path)
    (row,) = metrics(tmp_path)
    assert row["num_accepted"] == 1
    assert row["aggregated"] is False
    assert "fewer than min-train-nodes=2" in caplog.text
    for name in initial:
        np.testing.assert_array_equal(final[name], initial[name])


def test_sample_follows_client_ids_not_node_ids(tmp_path):
    samples = []
    for offset in (1000, 55555):
        run_dir = tmp_path / str(offset)
        cfg = loop_config(run_dir, **{"fraction-train": 0.5, "num-rounds": 3})
        grid = LocalGrid(synthetic_client_app(cfg), 6, node_id_offset=offset)
        run_rounds(grid, cfg, run_dir)
        sent = [m for m in grid.sent if m.metadata.message_type == "train"]
        by_round: dict[int, list[str]] = {}
        for message in sent:
            server_round = int(message.content["config"]["server-round"])
            by_round.setdefault(server_round, []).append(client_of(grid, message))
        assert [len(clients) for clients in by_round.values()] == [3, 3, 3]
        samples.append(by_round)
    assert samples[0] == samples[1]
    assert len({tuple(clients) for clients in samples[0].values()}) > 1  # sampling varies


def test_node_with_unserved_rank_is_not_sampled(tmp_path, caplog):
    cfg = loop_config(tmp_path, **{"num-rounds": 1})
    grid = LocalGrid(synthetic_client_app(cfg), 3, node_configs={1: {"lora-rank": 8}})
    with caplog.at_level("WARNING"):
        run_rounds(grid, cfg, tmp_path)
    (row,) = metrics(tmp_path)
    assert row["num_sampled"] == 2
    assert row["num_accepted"] == 2
    assert "client client-001" in caplog.text
    assert "lora-rank 8" in caplog.text


@pytest.mark.parametrize(
    "strategy", ["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad"]
)
def test_every_strategy_runs_and_moves_adapter(tmp_path, strategy):
    cfg = loop_config(tmp_path, strategy=strategy, **{"num-rounds": 1})
    grid = LocalGrid(synthetic_client_app(cfg), 2)
    final = run_rounds(grid, cfg, tmp_path)
    config = next(m for m in grid.sent if m.metadata.message_type == "train").content["config"]
    assert ("proximal-mu" in config) == (strategy == "fedprox")
    assert any(np.any(value) for name, value in final.items() if ".lora_B." in name)


def test_half_precision_wires_halve_bytes(tmp_path):
    rows = {}
    for dtype in ("float32", "float16", "bfloat16"):
        run_dir = tmp_path / dtype
        cfg = loop_config(run_dir, **{"num-rounds": 1, "wire-dtype": dtype})
        grid = LocalGrid(synthetic_client_app(cfg), 2)
        run_rounds(grid, cfg, run_dir)
        sent = next(m for m in grid.sent if m.metadata.message_type == "train")
        assert {array.dtype for array in sent.content["arrays"].values()} == {dtype}
        (rows[dtype],) = metrics(run_dir)
        assert rows[dtype]["num_accepted"] == 2
    for dtype in ("float16", "bfloat16"):
        assert rows[dtype]["bytes_down"] * 2 == rows["float32"]["bytes_down"], dtype
        assert rows[dtype]["bytes_up"] * 2 == rows["float32"]["bytes_up"], dtype


def test_duplicate_client_id_is_not_sampled(tmp_path, caplog):
    cfg = loop_config(tmp_path, **{"num-rounds": 1})
    grid = LocalGrid(synthetic_client_app(cfg), 3, node_configs={1: {"client-id": "client-000"}})
    with caplog.at_level("WARNING"):
        run_rounds(grid, cfg, tmp_path)
    (row,) = metrics(tmp_path)
    assert row["num_sampled"] == 2
    assert row["num_accepted"] == 2
    assert "reports client id client-000, which node" in caplog.text
