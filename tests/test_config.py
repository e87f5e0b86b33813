"""Run config parsing: TOML round trip, flat Flower form, validation errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from common.config import ConfigError, RunConfig


def test_toml_round_trip(tmp_path):
    cfg = RunConfig().replace(server={"num_rounds": 7}, privacy={"target_epsilon": 3.0})
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml(), encoding="utf-8")
    loaded = RunConfig.from_toml(path)
    assert loaded == cfg
    assert loaded.server.num_rounds == 7
    assert loaded.privacy.target_epsilon == 3.0


def test_flat_form_matches_nested():
    cfg = RunConfig().replace(model={"lora_r": 8}, seed=3)
    flat = cfg.to_flat()
    assert flat["model.lora-r"] == 8
    assert flat["seed"] == 3
    assert RunConfig.from_dict(flat) == cfg


def test_unknown_key_names_section_and_key():
    with pytest.raises(ConfigError, match="unknown key server.num-round:"):
        RunConfig.from_dict({"server": {"num-round": 3}})


def test_invalid_value_names_key_and_value():
    with pytest.raises(ConfigError, match=r"privacy.target-delta = 1.5"):
        RunConfig.from_dict({"privacy": {"target-delta": 1.5}})


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="server.num-rounds = 'three': expected an integer"):
        RunConfig.from_dict({"server": {"num-rounds": "three"}})


def test_production_turns_secure_mode_on():
    cfg = RunConfig.from_dict({"privacy": {"production": True}})
    assert cfg.privacy.secure_mode is True


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        RunConfig.from_toml(tmp_path / "absent.toml")


def test_flower_run_config_defaults_equal_the_main_job():
    # `flwr run` reads [tool.flwr.app.config]; it must describe the same job as main.toml.
    root = Path(__file__).resolve().parents[1]
    with (root / "pyproject.toml").open("rb") as handle:
        flower = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    main = RunConfig.from_toml(root / "simulations" / "configs" / "main.toml")
    assert RunConfig.from_dict(flower).replace(output="") == main.replace(output="")
