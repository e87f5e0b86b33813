"""Server checkpoints: exact round trip, generator states, atomic replacement, metrics repair."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from common.config import RunConfig
from server.checkpoint import (
    CHECKPOINT_DIR,
    Checkpoint,
    capture_rng,
    config_differences,
    drop_rounds_after,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)


def make_checkpoint(server_round: int = 3) -> Checkpoint:
    rng = np.random.default_rng(server_round)
    return Checkpoint(
        server_round=server_round,
        strategy="fedadam",
        global_state={
            "layer.0.lora_A.default.weight": rng.normal(size=(4, 6)).astype(np.float32),
            "layer.0.lora_B.default.weight": rng.normal(size=(5, 4)).astype(np.float32),
        },
        optimizer_state={
            "t": np.asarray(server_round, np.int64),
            "m/layer.0.lora_A.default.weight": rng.normal(size=(4, 6)).astype(np.float32),
            "v/layer.0.lora_A.default.weight": rng.random(size=(4, 6)).astype(np.float32),
        },
        config=RunConfig().replace(server={"strategy": "fedadam"}).to_dict(),
        rng=capture_rng(random.Random(7)),
        clients={"client-000": {"epsilon": 1.5, "rounds_joined": [1, 2, 3]}},
    )


def test_round_trip_is_exact(tmp_path):
    saved = make_checkpoint()
    path = save_checkpoint(tmp_path, saved)
    assert path == tmp_path / CHECKPOINT_DIR
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert loaded.server_round == 3
    assert loaded.strategy == "fedadam"
    assert loaded.config == saved.config
    assert loaded.clients == saved.clients
    assert set(loaded.global_state) == set(saved.global_state)
    for key, value in saved.global_state.items():
        np.testing.assert_array_equal(loaded.global_state[key], value)
        assert loaded.global_state[key].dtype == np.float32
    assert set(loaded.optimizer_state) == set(saved.optimizer_state)
    for key, value in saved.optimizer_state.items():
        np.testing.assert_array_equal(loaded.optimizer_state[key], value)


def test_no_checkpoint_returns_none(tmp_path):
    assert load_checkpoint(tmp_path) is None


def draws(sampler: random.Random) -> tuple:
    return (
        random.random(),
        random.gauss(0, 1),
        sampler.sample(range(100), 5),
        np.random.rand(3).tolist(),
        np.random.randn(),
        torch.rand(3).tolist(),
    )


def test_generator_states_restore_the_same_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    sampler = random.Random(4)
    random.gauss(0, 1)  # leaves a cached Gaussian in both generators
    np.random.randn()
    checkpoint = make_checkpoint()
    checkpoint.rng = capture_rng(sampler)
    save_checkpoint(tmp_path, checkpoint)
    expected = draws(sampler)

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    other_sampler = random.Random(99)
    restore_rng(load_checkpoint(tmp_path).rng, other_sampler)
    assert draws(other_sampler) == expected


def test_new_checkpoint_replaces_old_without_leftovers(tmp_path):
    save_checkpoint(tmp_path, make_checkpoint(1))
    save_checkpoint(tmp_path, make_checkpoint(2))
    assert load_checkpoint(tmp_path).server_round == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_DIR]


def test_crash_between_renames_falls_back_to_previous(tmp_path):
    save_checkpoint(tmp_path, make_checkpoint(4))
    # The state after save_checkpoint moved the old folder aside and died before
    # renaming the new one into place.
    os.replace(tmp_path / CHECKPOINT_DIR, tmp_path / f".{CHECKPOINT_DIR}-old")
    (tmp_path / f".{CHECKPOINT_DIR}-abc123").mkdir()
    assert load_checkpoint(tmp_path).server_round == 4


def test_damaged_checkpoint_raises_with_fix(tmp_path):
    save_checkpoint(tmp_path, make_checkpoint())
    (tmp_path / CHECKPOINT_DIR / "arrays.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_other_version_raises(tmp_path):
    save_checkpoint(tmp_path, make_checkpoint())
    state_path = tmp_path / CHECKPOINT_DIR / "state.json"
    state = json.loads(state_path.read_text())
    state["version"] = 99
    state_path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="version 99"):
        load_checkpoint(tmp_path)


def test_drop_rounds_after_removes_unfinished_round(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"round": 1, "x": 1}, {"round": 2, "x": 2}, {"round": 2, "x": 9}, {"round": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"round": 4, "x"')
    assert drop_rounds_after(path, 2) == 3
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [{"round": 1, "x": 1}, {"round": 2, "x": 2}]


def test_drop_rounds_after_leaves_complete_file_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    text = '{"round": 1}\n{"round": 2}\n'
    path.write_text(text)
    before = path.stat().st_mtime_ns
    assert drop_rounds_after(path, 2) == 0
    assert path.read_text() == text
    assert path.stat().st_mtime_ns == before
    assert drop_rounds_after(tmp_path / "missing.jsonl", 1) == 0


def test_config_differences_ignore_paths_only():
    saved = RunConfig().replace(output="/old/run", data={"data_dir": "/old/data"}).to_dict()
    moved = RunConfig().replace(output="/new/run", data={"data_dir": "/new/data"}).to_dict()
    assert config_differences(saved, moved) == []
    changed = RunConfig().replace(server={"strategy": "fedyogi", "num_rounds": 9}).to_dict()
    assert config_differences(saved, changed) == ["server.num-rounds", "server.strategy"]
