"""FFA-LoRA: lora_A frozen at a shared seeded initialization, only lora_B trained and sent."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from local_grid import LocalGrid

from client.app import _check_frozen_lora, build_client_app
from common.adapter import frozen_lora_digest, get_adapter_arrays, payload_bytes, record_to_arrays
from common.config import ModelConfig, RunConfig
from common.model import build_lora_model
from server.loop import run_rounds
from simulations.run import prepare_run


@pytest.fixture(scope="module")
def ffa_models():
    """Two FFA-LoRA models built apart with seed 0, one with seed 1, and a plain LoRA one."""
    return (
        build_lora_model(ModelConfig(ffa_lora=True), seed=0),
        build_lora_model(ModelConfig(ffa_lora=True), seed=0),
        build_lora_model(ModelConfig(ffa_lora=True), seed=1),
        build_lora_model(ModelConfig(), seed=0),
    )


def lora_a(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}


def test_lora_a_frozen_and_shared(ffa_models):
    first, second, other_seed, _ = ffa_models
    a_first, a_second = lora_a(first), lora_a(second)
    assert a_first
    assert set(a_first) == set(a_second)
    for name in a_first:
        torch.testing.assert_close(a_first[name], a_second[name], rtol=0, atol=0)
    assert not any(p.requires_grad for n, p in first.named_parameters() if ".lora_A." in n)
    assert frozen_lora_digest(first) == frozen_lora_digest(second)
    assert frozen_lora_digest(first) != frozen_lora_digest(other_seed)


def test_payload_lora_b_only_half_size(ffa_models):
    ffa, _, _, plain = ffa_models
    ffa_payload = get_adapter_arrays(ffa)
    plain_payload = get_adapter_arrays(plain)
    assert ffa_payload and all(".lora_B." in name for name in ffa_payload)
    assert not any(".lora_A." in name for name in ffa_payload)
    # MiniLM's LoRA modules have sum(r * in) == sum(out * r), so exactly half.
    assert payload_bytes(ffa_payload) * 2 == payload_bytes(plain_payload)


def test_client_rejects_other_frozen_lora_a(ffa_models):
    first, _, other_seed, _ = ffa_models
    _check_frozen_lora(first, ConfigRecord({"lora-a-digest": frozen_lora_digest(first)}))
    _check_frozen_lora(first, ConfigRecord({}))  # plain LoRA runs send no digest
    with pytest.raises(ValueError, match="frozen lora_A differs"):
        _check_frozen_lora(first, ConfigRecord({"lora-a-digest": frozen_lora_digest(other_seed)}))


@pytest.mark.slow
def test_round_with_real_clients_sends_lora_b_only(tmp_path, data_dir, ffa_models):
    cfg = RunConfig.from_dict(
        {
            "seed": 0,
            "output": str(tmp_path / "run"),
            "model": {"ffa-lora": True},
            "data": {"data-dir": str(data_dir), "num-clients": 2, "max-examples-per-client": 16},
            "train": {"batch-size": 8, "local-epochs": 0.5},
            "privacy": {"dp": False},
            "server": {"num-rounds": 1, "eval-every": 0, "strategy": "fedprox"},
        }
    )
    cfg = prepare_run(cfg)
    grid = LocalGrid(build_client_app(cfg), 2)
    final = run_rounds(grid, cfg, tmp_path / "run")

    train_messages = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train_messages) == 2
    for message in train_messages:
        config = message.content["config"]
        assert config["lora-a-digest"] == frozen_lora_digest(ffa_models[0])
        assert config["proximal-mu"] == pytest.approx(cfg.server.proximal_mu)
        assert all(".lora_B." in name for name in record_to_arrays(message.content["arrays"]))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["num_accepted"] == 2
    assert row["num_failed"] == 0
    ffa_bytes = payload_bytes(get_adapter_arrays(ffa_models[0]))
    assert row["bytes_up"] == row["bytes_down"] == 2 * ffa_bytes
    assert set(final) == set(get_adapter_arrays(ffa_models[0]))
    assert any(np.any(value) for value in final.values())  # lora_B moved from zero
