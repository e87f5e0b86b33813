"""The hostile-client hook of the ClientApp (``data.attack-client``), run on real training."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from local_grid import LocalGrid

from client.app import attack_scale_for, attack_update, build_client_app
from common.adapter import arrays_to_record, get_adapter_arrays, record_to_arrays
from common.config import ConfigError, RunConfig
from common.model import build_lora_model

SCALE = 100.0


def client_config(tmp_path, data_dir, **data) -> RunConfig:
    return RunConfig.from_dict(
        {
            "seed": 0,
            "output": str(tmp_path),
            "data": {
                "data-dir": str(data_dir),
                "num-clients": 2,
                "max-examples-per-client": 8,
                **data,
            },
            "train": {"batch-size": 4, "local-epochs": 0.5},
            "privacy": {"dp": False},
        }
    )


def train_replies(cfg: RunConfig, sent: dict[str, np.ndarray]) -> dict[int, dict]:
    """Send ``sent`` to both clients of a local grid; return each reply's adapter by partition."""
    grid = LocalGrid(build_client_app(cfg), 2)
    config = ConfigRecord({"server-round": 1, "num-rounds": 1, "wire-dtype": "float32"})
    messages = [
        Message(RecordDict({"arrays": arrays_to_record(sent), "config": config}), node, "train")
        for node in grid.get_node_ids()
    ]
    replies = grid.send_and_receive(messages)
    return {
        grid.partitions[reply.metadata.src_node_id]: record_to_arrays(reply.content["arrays"])
        for reply in replies
    }


def test_hostile_reply_scales_update(tmp_path, data_dir, caplog):
    honest_cfg = client_config(tmp_path / "honest", data_dir)
    hostile_cfg = client_config(
        tmp_path / "hostile", data_dir, **{"attack-client": 1, "attack-scale": SCALE}
    )
    # A non-zero starting adapter, so sent and trained differ in every tensor.
    rng = np.random.default_rng(0)
    sent = {
        name: (value + 0.01 * rng.standard_normal(value.shape)).astype(np.float32)
        for name, value in get_adapter_arrays(build_lora_model(honest_cfg.model)).items()
    }

    honest = train_replies(honest_cfg, sent)
    with caplog.at_level("WARNING", logger="client.app"):
        hostile = train_replies(hostile_cfg, sent)

    assert set(hostile) == {0, 1}
    for name, value in honest[0].items():
        np.testing.assert_array_equal(hostile[0][name], value)
    moved = 0
    for name, trained in honest[1].items():
        expected = sent[name] + np.float32(SCALE) * (trained - sent[name])
        np.testing.assert_allclose(hostile[1][name], expected, rtol=1e-5, atol=1e-6)
        moved += int(np.any(trained != sent[name]))
    assert moved > 0
    assert "client client-001 is hostile" in caplog.text
    assert "client client-000 is hostile" not in caplog.text


def test_attack_update_formula():
    sent = {"w": np.array([1.0, -2.0], np.float32)}
    trained = {"w": np.array([1.5, -2.0], np.float32)}
    out = attack_update(sent, trained, scale=SCALE)
    np.testing.assert_allclose(out["w"], [51.0, -2.0])
    assert out["w"].dtype == np.float32


def test_attack_off_by_default():
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    assert RunConfig().data.attack_client == -1
    assert attack_scale_for(RunConfig(), context) is None


def test_attack_needs_partition_id():
    cfg = RunConfig.from_dict({"data": {"attack-client": 0}})
    context = Context(1, 1, {"client-id": "acme"}, RecordDict(), {})
    with pytest.raises(ValueError, match="data.attack-client = 0 .* has none"):
        attack_scale_for(cfg, context)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"attack-client": -2}, "data.attack-client = -2"),
        ({"attack-client": 20}, "data.attack-client = 20"),
        ({"attack-client": 2, "num-clients": 2}, "partition id from 0 to 1"),
        ({"attack-scale": float("nan")}, "data.attack-scale = nan"),
        ({"attack-scale": float("inf")}, "data.attack-scale = inf"),
    ],
)
def test_attack_config_rejects(data, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict({"data": data})
