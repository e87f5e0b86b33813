"""Config keys, CLI flags and client ranks of strategies, robustness, wire format and resume."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from client.app import client_rank, rank_config
from common.cli import build_parser, config_from_args
from common.config import ConfigError, ModelConfig, RunConfig, ServerConfig


def context(**node_config) -> Context:
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})


def test_client_ranks_parse_and_max():
    model = ModelConfig(client_ranks=" 4, 8,16 ")
    assert model.rank_list == (4, 8, 16)
    assert model.max_rank == 16
    assert ModelConfig(lora_r=6).rank_list == ()
    assert ModelConfig(lora_r=6).max_rank == 6


@pytest.mark.parametrize("text", ["4,x", "0,8", "-4", "4.5"])
def test_invalid_client_ranks_name_the_key(text):
    with pytest.raises(ConfigError, match="model.client-ranks"):
        ModelConfig(client_ranks=text)


def test_ffa_lora_with_client_ranks_is_rejected():
    with pytest.raises(ConfigError, match="model.ffa-lora"):
        ModelConfig(ffa_lora=True, client_ranks="4,8")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("weighting", "tokens"),
        ("robust", "krum"),
        ("wire-dtype", "int8"),
        ("trim-fraction", 0.5),
        ("beta-1", 1.0),
        ("tau", 0.0),
        ("norm-bound", -1.0),
        ("max-payload-bytes", -1),
    ],
)
def test_invalid_server_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"server.{key}"):
        RunConfig.from_dict({"server": {key: value}})


def test_server_defaults_keep_plain_fedavg():
    server = ServerConfig()
    assert (server.strategy, server.weighting, server.robust, server.wire_dtype) == (
        "fedavg",
        "examples",
        "none",
        "float32",
    )
    assert server.norm_bound == server.max_update_norm == server.max_payload_bytes == 0


def test_client_rank_sources():
    cfg = RunConfig.from_dict({"model": {"client-ranks": "4,8,16"}})
    assert [client_rank(cfg, context(**{"partition-id": pid})) for pid in range(5)] == [
        4,
        8,
        16,
        4,
        8,
    ]
    assert client_rank(cfg, context(**{"partition-id": 0, "lora-rank": 2})) == 2
    assert client_rank(RunConfig(), context(**{"partition-id": 3})) == 4  # model.lora-r
    with pytest.raises(ValueError, match="lora-rank=R"):
        client_rank(cfg, context(**{"client-id": "acme"}))
    with pytest.raises(ValueError, match="invalid node config lora-rank"):
        client_rank(cfg, context(**{"lora-rank": 0}))
    assert rank_config(cfg, 8).model.lora_r == 8
    plain = RunConfig()
    assert rank_config(plain, 4) is plain  # rank 4 is model.lora-r: same config, same cache


def test_simulate_flags_reach_config():
    args = build_parser().parse_args(
        [
            "simulate",
            "--strategy", "fedyogi",
            "--weighting", "uniform",
            "--server-learning-rate", "0.2",
            "--robust", "trimmed-mean",
            "--norm-bound", "3",
            "--max-update-norm", "50",
            "--round-timeout", "30",
            "--wire-dtype", "float16",
            "--client-ranks", "2,4",
            "--proximal-mu", "0.5",
        ]
    )  # fmt: skip
    cfg = config_from_args(args)
    server = cfg.server
    assert (server.strategy, server.weighting, server.robust) == (
        "fedyogi",
        "uniform",
        "trimmed-mean",
    )
    assert server.server_learning_rate == 0.2
    assert server.norm_bound == 3.0
    assert server.max_update_norm == 50.0
    assert server.round_timeout == 30.0
    assert server.wire_dtype == "float16"
    assert server.proximal_mu == 0.5
    assert cfg.model.rank_list == (2, 4)
    assert config_from_args(build_parser().parse_args(["simulate", "--ffa-lora"])).model.ffa_lora


def test_resume_reads_run_config_and_rejects_other_flags(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = RunConfig().replace(server={"strategy": "fedadam", "num_rounds": 7}, seed=5)
    (run_dir / "config.toml").write_text(saved.to_toml())

    cfg = config_from_args(build_parser().parse_args(["simulate", "--resume", str(run_dir)]))
    assert cfg.server.strategy == "fedadam"
    assert cfg.server.num_rounds == 7
    assert cfg.seed == 5
    assert cfg.output == str(run_dir)

    args = build_parser().parse_args(
        ["simulate", "--resume", str(run_dir), "--num-rounds", "9", "--no-dp"]
    )
    with pytest.raises(ConfigError, match="--no-dp, --num-rounds"):
        config_from_args(args)
    with pytest.raises(ConfigError, match="config file not found"):
        config_from_args(build_parser().parse_args(["simulate", "--resume", str(tmp_path)]))


def test_data_dir_env_applies_with_config(tmp_path, monkeypatch):
    # A config without data.data-dir takes the folder from FEDADS_DATA_DIR, as no config does.
    monkeypatch.setenv("FEDADS_DATA_DIR", str(tmp_path / "env-data"))
    plain = tmp_path / "plain.toml"
    plain.write_text("[server]\nnum-rounds = 2\n")
    cfg = config_from_args(build_parser().parse_args(["simulate", "--config", str(plain)]))
    assert cfg.data.data_dir == str(tmp_path / "env-data")


def test_config_data_dir_beats_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDADS_DATA_DIR", str(tmp_path / "env-data"))
    pinned = tmp_path / "pinned.toml"
    pinned.write_text('[data]\ndata-dir = "from-config"\n')
    args = build_parser().parse_args(["simulate", "--config", str(pinned)])
    assert config_from_args(args).data.data_dir == "from-config"
    args = build_parser().parse_args(["simulate", "--config", str(pinned), "--data-dir", "flag"])
    assert config_from_args(args).data.data_dir == "flag"


def test_partition_flags_reach_config():
    args = build_parser().parse_args(
        ["simulate", "--partitioner", "column", "--partition-column", "audience"]
    )
    data = config_from_args(args).data
    assert data.partitioner == "column"
    assert data.partition_column == "audience"
    iid = build_parser().parse_args(["simulate", "--partitioner", "iid"])
    assert config_from_args(iid).data.partitioner == "iid"


def test_fedavgm_flags_reach_config():
    args = build_parser().parse_args(
        [
            "simulate",
            "--strategy", "fedavgm",
            "--server-learning-rate", "1.0",
            "--server-momentum", "0.5",
        ]
    )  # fmt: skip
    server = config_from_args(args).server
    assert server.strategy == "fedavgm"
    assert server.server_learning_rate == 1.0
    assert server.server_momentum == 0.5
