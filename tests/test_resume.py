"""Checkpoint and resume: a stopped server continues to the same result, no round lost or redone."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from local_grid import LocalGrid, ServerStopped, dp_run_config, synthetic_client_app

from client.app import build_client_app
from common.config import RunConfig
from common.secagg import records
from server.checkpoint import load_checkpoint
from server.loop import run_rounds


def loop_config(run_dir, **server) -> RunConfig:
    return RunConfig.from_dict(
        {
            "seed": 0,
            "output": str(run_dir),
            "privacy": {"dp": False},
            "server": {
                "num-rounds": 3,
                "eval-every": 0,
                "strategy": "fedadam",
                "fraction-train": 0.6,
                **server,
            },
        }
    )


def rounds(run_dir) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["round"] for line in lines]


def assert_same_adapter(first, second):
    assert set(first) == set(second)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


@pytest.mark.parametrize(
    "server", [{"strategy": "fedadam"}, {"strategy": "fedavgm", "server-learning-rate": 1.0}]
)
def test_stopped_server_resumes_to_same_adapter(tmp_path, server):
    # Both strategies keep optimizer state (moments, velocity) that the checkpoint carries.
    straight_dir, stopped_dir = tmp_path / "straight", tmp_path / "stopped"
    straight_cfg = loop_config(straight_dir, **server)
    stopped_cfg = loop_config(stopped_dir, **server)
    expected = run_rounds(
        LocalGrid(synthetic_client_app(straight_cfg), 5), straight_cfg, straight_dir
    )

    # Stop once round 2's replies are in: round 2 has no checkpoint and must run again.
    grid = LocalGrid(synthetic_client_app(stopped_cfg), 5, stop_after_round=2)
    with pytest.raises(ServerStopped):
        run_rounds(grid, stopped_cfg, stopped_dir)
    assert rounds(stopped_dir) == [1]
    assert load_checkpoint(stopped_dir).server_round == 1

    # A restarted federation has new node ids; sampling follows client ids regardless.
    restarted = LocalGrid(synthetic_client_app(stopped_cfg), 5, node_id_offset=77777)
    resumed = run_rounds(restarted, stopped_cfg, stopped_dir)

    assert_same_adapter(resumed, expected)
    assert rounds(stopped_dir) == [1, 2, 3]
    checkpoint = load_checkpoint(stopped_dir)
    assert checkpoint.server_round == 3
    if server["strategy"] == "fedadam":
        assert int(checkpoint.optimizer_state["t"]) == 3  # FedAdam took one step per round
    else:
        assert checkpoint.optimizer_state  # the velocity
        assert all(key.startswith("velocity/") for key in checkpoint.optimizer_state)
    assert not any(
        m.metadata.message_type == "train" and int(m.content["config"]["server-round"]) == 1
        for m in restarted.sent
    )


def test_line_of_round_without_checkpoint_is_replaced(tmp_path):
    cfg = loop_config(tmp_path, **{"num-rounds": 2})
    with pytest.raises(ServerStopped):
        run_rounds(LocalGrid(synthetic_client_app(cfg), 3, stop_after_round=2), cfg, tmp_path)
    # A crash after the round's metrics line but before its checkpoint leaves this line.
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"round": 2, "num_trained": -1}) + "\n")
    run_rounds(LocalGrid(synthetic_client_app(cfg), 3), cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    assert rows[1]["num_trained"] == 2


def test_finished_run_resumes_to_nothing(tmp_path):
    cfg = loop_config(tmp_path, **{"num-rounds": 1})
    first = run_rounds(LocalGrid(synthetic_client_app(cfg), 3), cfg, tmp_path)
    grid = LocalGrid(synthetic_client_app(cfg), 3)
    again = run_rounds(grid, cfg, tmp_path)
    assert not grid.sent
    assert rounds(tmp_path) == [1]
    assert_same_adapter(again, first)


def test_resume_with_other_config_is_refused(tmp_path):
    cfg = loop_config(tmp_path, **{"num-rounds": 1})
    run_rounds(LocalGrid(synthetic_client_app(cfg), 3), cfg, tmp_path)
    other = loop_config(tmp_path, **{"num-rounds": 1, "strategy": "fedyogi"})
    with pytest.raises(ValueError, match="server.strategy"):
        run_rounds(LocalGrid(synthetic_client_app(other), 3), other, tmp_path)


@pytest.mark.slow
def test_dp_clients_resend_counted_round_after_restart(tmp_path, data_dir):
    """Real DP clients: the rerun round costs no second ledger event and changes nothing."""

    straight_dir, stopped_dir = tmp_path / "straight", tmp_path / "stopped"
    straight_cfg = dp_run_config(straight_dir, data_dir, num_clients=2, num_rounds=2)
    stopped_cfg = dp_run_config(stopped_dir, data_dir, num_clients=2, num_rounds=2)
    expected = run_rounds(LocalGrid(build_client_app(straight_cfg), 2), straight_cfg, straight_dir)

    with pytest.raises(ServerStopped):
        run_rounds(
            LocalGrid(build_client_app(stopped_cfg), 2, stop_after_round=2),
            stopped_cfg,
            stopped_dir,
        )
    # The clients finished round 2 and counted it before the server stopped.
    before = json.loads((stopped_dir / "ledgers" / "client-000.json").read_text())
    assert before["rounds_joined"] == [1, 2]
    resumed = run_rounds(
        LocalGrid(build_client_app(stopped_cfg), 2, node_id_offset=4242), stopped_cfg, stopped_dir
    )

    assert_same_adapter(resumed, expected)
    rows = [json.loads(line) for line in (stopped_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    assert rows[1]["num_replayed"] == 2
    privacy = json.loads((stopped_dir / "privacy.json").read_text())
    for client_id in ("client-000", "client-001"):
        ledger = json.loads((stopped_dir / "ledgers" / f"{client_id}.json").read_text())
        straight = json.loads((straight_dir / "ledgers" / f"{client_id}.json").read_text())
        assert ledger["rounds_joined"] == [1, 2]
        assert len(ledger["events"]) == 2
        assert ledger["epsilon"] == pytest.approx(straight["epsilon"])
        assert privacy["clients"][client_id]["rounds_joined"] == [1, 2]
        assert privacy["clients"][client_id]["epsilon"] == pytest.approx(ledger["epsilon"])
    shutil.rmtree(straight_dir)


@pytest.mark.slow
def test_secagg_rerun_declined(tmp_path, data_dir, caplog):
    """A stored update is never masked in a second session: the rerun round is declined."""
    run_dir = tmp_path / "run"
    cfg = dp_run_config(
        run_dir,
        data_dir,
        num_clients=3,
        num_rounds=2,
        server={"secure-aggregation": True, "norm-bound": 20.0},
    )
    # Stop once round 2's masked inputs are in: each client trained, counted and stored it.
    with pytest.raises(ServerStopped):
        run_rounds(
            LocalGrid(
                build_client_app(cfg),
                3,
                stop_after_round=2,
                stop_after_action=records.MASKED_INPUT_ACTION,
            ),
            cfg,
            run_dir,
        )
    with caplog.at_level(logging.WARNING):
        run_rounds(LocalGrid(build_client_app(cfg), 3, node_id_offset=4242), cfg, run_dir)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    assert rows[0]["num_trained"] == 3
    assert rows[1]["num_declined"] == 3
    assert rows[1]["num_trained"] == rows[1]["num_replayed"] == 0
    assert "masking it again in a new session could expose it" in caplog.text
    for client_id in ("client-000", "client-001", "client-002"):
        ledger = json.loads((run_dir / "ledgers" / f"{client_id}.json").read_text())
        assert ledger["rounds_joined"] == [1, 2]  # round 2 counted once, when it was trained
        assert len(ledger["events"]) == 2


def test_secagg_key_exchange_failure_costs_nothing(tmp_path, data_dir, caplog):
    """Clients train in the masked-input stage, so a round lost at key exchange spends nothing."""
    run_dir = tmp_path / "run"
    cfg = dp_run_config(
        run_dir,
        data_dir,
        num_clients=3,
        num_rounds=1,
        server={"secure-aggregation": True, "norm-bound": 20.0},
    )
    # Two of 3 clients vanish before sharing their keys: below the threshold of 2 holders.
    grid = LocalGrid(
        build_client_app(cfg),
        3,
        dropouts={0: records.SHARE_KEYS_ACTION, 1: records.SHARE_KEYS_ACTION},
    )
    with caplog.at_level(logging.ERROR):
        run_rounds(grid, cfg, run_dir)

    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["aggregated"] is False
    assert row["num_trained"] == 0
    assert "round 1 failed at stage" in caplog.text
    for client_id in ("client-000", "client-001", "client-002"):
        ledger_file = run_dir / "ledgers" / f"{client_id}.json"
        if ledger_file.exists():
            assert json.loads(ledger_file.read_text())["events"] == []
