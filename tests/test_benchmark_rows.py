"""Benchmark rows: the configs each mode builds, their names and overrides, without training."""

from __future__ import annotations

import json

import pytest

from common.cli import MAIN_CONFIG
from common.config import ConfigError, RunConfig
from simulations import benchmark
from simulations.benchmark_rows import (
    STRATEGY_KEYS,
    apply_overrides,
    attack_rows,
    build_rows,
    exposure_rows,
    parse_epsilons,
    parse_strategy_keys,
    strategy_rows,
    unit_rows,
)
from simulations.benchmark_table import attack_summary, format_table

ALL_MODES = ("nodp", "dp", "strategies", "attack", "units", "exposure")


@pytest.fixture(scope="module")
def main_cfg() -> RunConfig:
    return RunConfig.from_toml(MAIN_CONFIG)


def by_key(rows) -> dict:
    return {row.key.rsplit("-eps", 1)[0].removeprefix("strategies-"): row for row in rows}


def test_strategy_rows_main_config(main_cfg):
    rows = strategy_rows(main_cfg, [8.0])
    assert [row.key for row in rows] == [f"strategies-{key}-eps8" for key in STRATEGY_KEYS]
    assert len({row.name for row in rows}) == len(rows)
    found = by_key(rows)

    assert found["fedavg"].name == "FedAvg, DP ε=8"
    assert found["fedavg"].config_diff(main_cfg) == {}
    assert found["fedavgm"].config_diff(main_cfg) == {
        "server.strategy": "fedavgm",
        "server.server-learning-rate": 1.0,
    }
    assert found["fedavgm"].name == "FedAvgM (server learning rate 1, momentum 0.9), DP ε=8"
    assert found["fedprox"].config_diff(main_cfg) == {"server.strategy": "fedprox"}
    assert found["fedadam"].config(main_cfg).server.strategy == "fedadam"
    assert found["ffa-lora"].config_diff(main_cfg) == {"model.ffa-lora": True}
    assert "FFA-LoRA (lora_A frozen)" in found["ffa-lora"].name
    assert found["mixed-ranks"].config_diff(main_cfg) == {"model.client-ranks": "4,8,16"}
    assert found["mixed-ranks"].config(main_cfg).model.max_rank == 16
    for row in rows:
        cfg = row.config(main_cfg)
        assert cfg.privacy.dp is True
        assert cfg.privacy.target_epsilon == 8.0
        assert row.epsilon == 8.0


def test_strategy_rows_base_with_ffa(main_cfg):
    base = apply_overrides(main_cfg, {"model.ffa-lora": True})
    found = by_key(strategy_rows(base, [8.0]))

    assert found["fedavg"].config(base).model.ffa_lora is True
    assert found["ffa-lora"].name == "FedAvg, lora_A trained (FFA-LoRA off), DP ε=8"
    assert found["ffa-lora"].config_diff(base) == {"model.ffa-lora": False}
    mixed = found["mixed-ranks"]
    assert mixed.config_diff(base) == {"model.client-ranks": "4,8,16", "model.ffa-lora": False}
    assert "mixed ranks exclude FFA-LoRA" in mixed.name
    assert mixed.config(base).model.ffa_lora is False


def test_strategy_rows_base_with_mixed_ranks(main_cfg):
    base = apply_overrides(main_cfg, {"model.client-ranks": "2,4"})
    found = by_key(strategy_rows(base, [3.0]))

    ffa = found["ffa-lora"]
    assert ffa.config_diff(base) == {
        "privacy.target-epsilon": 3.0,
        "model.ffa-lora": True,
        "model.client-ranks": "",
    }
    assert "one LoRA rank 4" in ffa.name
    assert ffa.config(base).model.rank_list == ()
    mixed = found["mixed-ranks"]
    assert mixed.name == "FedAvg, one LoRA rank 4, DP ε=3"
    assert mixed.config(base).model.rank_list == ()


def test_mixed_ranks_turn_secure_aggregation_off(main_cfg):
    base = apply_overrides(main_cfg, {"server.secure-aggregation": True, "server.norm-bound": 5.0})
    mixed = by_key(strategy_rows(base, [8.0]))["mixed-ranks"]
    assert mixed.config_diff(base)["server.secure-aggregation"] is False
    assert "secure aggregation off" in mixed.name
    assert mixed.config(base).server.secure_aggregation is False


def test_ffa_and_mixed_ranks_conflict():
    with pytest.raises(ConfigError, match="model.ffa-lora"):
        RunConfig.from_dict({"model": {"ffa-lora": True, "client-ranks": "4,8,16"}})


def test_strategy_keys_parse():
    assert parse_strategy_keys("") == STRATEGY_KEYS
    assert parse_strategy_keys("fedavg, ffa-lora") == ("fedavg", "ffa-lora")
    with pytest.raises(ConfigError, match="invalid --strategies entries \\['fedsgd'\\]"):
        parse_strategy_keys("fedavg,fedsgd")


def test_attack_rows_median(main_cfg):
    base = apply_overrides(main_cfg, {"server.robust": "trimmed-mean"})
    clean, unprotected, protected = attack_rows(
        base, [8.0], client=3, scale=100.0, defense="median"
    )
    assert [row.role for row in (clean, unprotected, protected)] == [
        "clean",
        "unprotected",
        "protected",
    ]
    assert clean.config(base).data.attack_client == -1
    assert clean.config(base).server.robust == "none"
    attacked = unprotected.config(base)
    assert attacked.data.attack_client == 3
    assert attacked.data.attack_scale == 100.0
    assert attacked.server.robust == "none"
    assert attacked.server.norm_bound == 0.0
    shielded = protected.config(base)
    assert shielded.data.attack_client == 3
    assert shielded.server.robust == "median"
    assert "coordinate-wise median" in protected.name
    assert "×100" in unprotected.name
    assert len({clean.name, unprotected.name, protected.name}) == 3


def test_attack_rows_norm_bound(main_cfg):
    rows = attack_rows(main_cfg, [8.0], client=0, scale=100.0, defense="norm-bound", norm_bound=2)
    protected = rows[-1].config(main_cfg)
    assert protected.server.robust == "none"
    assert protected.server.norm_bound == 2.0
    with pytest.raises(ConfigError, match="--attack-norm-bound 0.0"):
        attack_rows(main_cfg, [8.0], client=0, scale=100.0, defense="norm-bound")


def test_attack_rows_reject_bases(main_cfg):
    advertiser = apply_overrides(
        main_cfg,
        {
            "advertiser-dp.enabled": True,
            "advertiser-dp.noise-multiplier": 1.0,
            "server.weighting": "uniform",
        },
    )
    with pytest.raises(ConfigError, match="advertiser-dp.enabled = true for --only attack"):
        attack_rows(advertiser, [8.0], client=0, scale=100.0, defense="median")
    secure = apply_overrides(
        main_cfg, {"server.secure-aggregation": True, "server.norm-bound": 5.0}
    )
    with pytest.raises(ConfigError, match="secure-aggregation = true for --only attack"):
        attack_rows(secure, [8.0], client=0, scale=100.0, defense="median")
    with pytest.raises(ConfigError, match="data.attack-client = 25"):
        attack_rows(main_cfg, [8.0], client=25, scale=100.0, defense="median")[1].config(main_cfg)


def test_unit_rows(main_cfg):
    base = apply_overrides(main_cfg, {"server.robust": "median"})
    advertiser, record = unit_rows(base, [8.0])
    assert "unit: all of one advertiser's records" in advertiser.name
    assert "unit: one record" in record.name
    adv_cfg = advertiser.config(base)
    assert adv_cfg.advertiser_dp.enabled is True
    assert adv_cfg.advertiser_dp.target_epsilon == 8.0
    assert adv_cfg.advertiser_dp.target_delta == base.privacy.target_delta
    assert adv_cfg.privacy.dp is False
    assert adv_cfg.server.weighting == "uniform"
    assert adv_cfg.server.robust == "none"
    rec_cfg = record.config(base)
    assert rec_cfg.privacy.dp is True
    assert rec_cfg.privacy.target_epsilon == 8.0
    assert rec_cfg.advertiser_dp.enabled is False


def test_exposure_rows_default_epsilons():
    rows = exposure_rows(parse_epsilons(None, "exposure"))
    assert [row.epsilon for row in rows] == [8.0, 3.0]
    assert [row.overrides["privacy.target-epsilon"] for row in rows] == [8.0, 3.0]


def test_epsilons_parse():
    assert parse_epsilons(None, "strategies") == (8.0,)
    assert parse_epsilons(None, "dp") == (8.0, 3.0)
    assert parse_epsilons("2, 4", "attack") == (2.0, 4.0)
    with pytest.raises(ConfigError, match="invalid --epsilons 'x'"):
        parse_epsilons("x", "dp")
    with pytest.raises(ConfigError, match="finite numbers > 0"):
        parse_epsilons("8,0", "dp")


def test_all_modes_names_unique(main_cfg):
    rows = build_rows(ALL_MODES, main_cfg, epsilons="8,3")
    assert len({row.name for row in rows}) == len(rows)
    assert len({row.key for row in rows}) == len(rows)
    assert {row.mode for row in rows} == set(ALL_MODES)
    assert len(rows) == 1 + 2 + len(STRATEGY_KEYS) * 2 + 3 * 2 + 2 * 2 + 2


def test_attack_summary_ratios():
    utility = {
        "c": {"mode": "attack", "role": "clean", "epsilon": 8.0, "bleu": 20.0},
        "u": {"mode": "attack", "role": "unprotected", "epsilon": 8.0, "bleu": 1.0},
        "p": {"mode": "attack", "role": "protected", "epsilon": 8.0, "bleu": 18.0},
        "other": {"mode": "dp", "epsilon": 8.0, "bleu": 5.0},
    }
    summary = attack_summary(utility)["ε=8"]
    assert summary["protected_over_clean"] == pytest.approx(0.9)
    assert summary["unprotected_over_clean"] == pytest.approx(0.05)
    assert summary["protected_name"] == "p"


def fake_scores(row, base, output, *, eval_limit):
    bleu = {"clean": 20.0, "unprotected": 2.0, "protected": 15.0}.get(row.role, 10.0)
    return {
        "bleu": bleu,
        "rouge_l": 30.0,
        "slot_error_rate": 0.5,
        "mode": row.mode,
        "epsilon": row.epsilon,
        "role": row.role,
        "overrides": dict(row.overrides),
        "config_diff": row.config_diff(base),
    }


def fake_audit(row, base, output, *, candidates):
    entry = {
        "bits": 1.5,
        "max_bits": 3.0,
        "rank": 2,
        "extrapolated_bits": 4.5,
        "epsilon_spent": 7.9,
    }
    return {
        f"exposure {row.epsilon:g}": {**entry, "config_diff": row.config_diff(base)},
        f"control {row.epsilon:g}": {
            **entry,
            "bits": 3.0,
            "epsilon_spent": None,
            "config_diff": {"privacy.dp": False},
        },
    }


def test_main_records_scale_and_table(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "run_row", fake_scores)
    monkeypatch.setattr(benchmark, "audit_entries", fake_audit)
    argv = [
        "--data-dir",
        str(data_dir),
        "--output",
        str(tmp_path),
        "--only",
        "strategies,attack,units,exposure",
        "--strategies",
        "fedavg,fedprox",
        "--num-rounds",
        "1",
        "--num-clients",
        "4",
        "--max-examples-per-client",
        "8",
    ]
    assert benchmark.main(argv) == 0

    results = json.loads((tmp_path / "benchmark.json").read_text())
    assert results["setup"]["scale"] == {
        "server.num-rounds": 1,
        "data.num-clients": 4,
        "data.max-examples-per-client": 8,
    }
    assert "4 clients, 1 rounds" in results["base"]
    assert len(results["utility"]) == 2 + 3 + 2
    assert results["attack"]["ε=8"]["protected_over_clean"] == pytest.approx(0.75)
    table = capsys.readouterr().out
    assert (
        '| FedProx (μ=0.01), DP ε=8 | 10.00 | 30.00 | 0.500 | `server.strategy = "fedprox"` |'
        in table
    )
    assert "| FedAvg, DP ε=8 | 10.00 | 30.00 | 0.500 | (base config) |" in table
    assert "attacked-protected / clean 0.750" in table
    assert "| control 3 | 3.00 | 3.00 | 2 | 4.50 | off | `privacy.dp = false` |" in table
    assert "| exposure 8 | 1.50 | 3.00 | 2 | 4.50 | 7.90 |" in table
    assert "server.num-rounds = 1" in table

    # Another scale must not extend the same results file.
    with pytest.raises(SystemExit):
        benchmark.main([*argv[:-2], "--max-examples-per-client", "16"])


def test_main_rejects_bad_strategy(tmp_path, data_dir):
    with pytest.raises(SystemExit):
        benchmark.main(
            [
                "--data-dir",
                str(data_dir),
                "--output",
                str(tmp_path),
                "--only",
                "strategies",
                "--strategies",
                "fedsgd",
            ]
        )
    with pytest.raises(SystemExit):
        benchmark.main(["--data-dir", str(data_dir), "--output", str(tmp_path), "--only", "x"])


def test_format_table_without_setup():
    table = format_table(
        {"utility": {"federated, no DP": {"bleu": 1.0, "rouge_l": 2.0, "slot_error_rate": None}}}
    )
    assert "| federated, no DP | 1.00 | 2.00 | n/a | (base config) |" in table


@pytest.mark.slow
def test_strategies_smoke_run(tmp_path, data_dir, capsys):
    argv = [
        "--data-dir",
        str(data_dir),
        "--output",
        str(tmp_path),
        "--only",
        "strategies",
        "--strategies",
        "fedavg",
        "--num-clients",
        "2",
        "--num-rounds",
        "1",
        "--max-examples-per-client",
        "8",
        "--eval-limit",
        "2",
    ]
    assert benchmark.main(argv) == 0

    results = json.loads((tmp_path / "benchmark.json").read_text())
    (name,) = results["utility"]
    assert name == "FedAvg, DP ε=8"
    row = results["utility"][name]
    assert 0.0 <= row["bleu"] <= 100.0
    assert row["config_diff"] == {}
    assert (tmp_path / "strategies-fedavg-eps8" / "global_adapter").is_dir()
    assert "| FedAvg, DP ε=8 |" in capsys.readouterr().out


def test_aggregation_skip_client_round(tmp_path, data_dir, monkeypatch):
    def no_client_round(*args, **kwargs):
        raise AssertionError("--skip-client-round should not time a client round")

    monkeypatch.setattr(benchmark, "time_aggregation", lambda cfg, repeats: {"none": {20: 0.05}})
    monkeypatch.setattr(benchmark, "payload_ratios", lambda cfg: [])
    monkeypatch.setattr(benchmark, "time_client_round", no_client_round)
    argv = ["--data-dir", str(data_dir), "--output", str(tmp_path), "--only", "aggregation"]

    assert benchmark.main([*argv, "--skip-client-round"]) == 0

    results = json.loads((tmp_path / "benchmark.json").read_text())
    assert "client_round" not in results
    assert results["aggregation_s"] == {"none": {"20": 0.05}}
