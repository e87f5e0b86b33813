"""Memorisation audit: canary planting, exposure and a real DP audit."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from common.cli import _simulate_defaults, build_parser, config_from_args
from common.config import ConfigError, RunConfig
from simulations.audit import (
    AuditSettings,
    CanaryFormat,
    draw_codes,
    exposure,
    extrapolated_exposure,
    render_audit,
    run_audit,
)
from simulations.dataset import federated_data


def test_canary_format_renders_zero_padded_code():
    fmt = CanaryFormat("my voucher code is {code}", digits=6)
    assert fmt.render(42) == "my voucher code is 000042"
    assert fmt.space == 1_000_000
    with pytest.raises(ConfigError, match="exactly one"):
        CanaryFormat("no code here")
    with pytest.raises(ConfigError, match="exactly one"):
        CanaryFormat("{code} and {code}")
    with pytest.raises(ConfigError, match="code digits 0"):
        CanaryFormat(digits=0)


def test_audit_settings_validate():
    with pytest.raises(ConfigError, match="repeats 0"):
        AuditSettings(repeats=0)
    with pytest.raises(ConfigError, match="candidates -1"):
        AuditSettings(candidates=-1)
    with pytest.raises(
        ConfigError,
        match=r"candidates 0 \(every other code\) for 10 code digits: 9,999,999,999 codes",
    ):
        AuditSettings(canary=CanaryFormat(digits=10))


def test_audit_default_ranks_whole_space():
    assert AuditSettings().candidate_count == 999_999
    assert AuditSettings(candidates=5_000).candidate_count == 5_000
    assert AuditSettings(canary=CanaryFormat(digits=3), candidates=5_000).candidate_count == 999
    assert AuditSettings(canary=CanaryFormat(digits=10), candidates=50).candidate_count == 50


def test_draw_codes_excludes_secret():
    rng = np.random.default_rng(0)
    secret, candidates = draw_codes(1_000_000, 5_000, rng)
    assert 0 <= secret < 1_000_000
    assert len(candidates) == 5_000
    assert len(set(candidates.tolist())) == 5_000
    assert secret not in set(candidates.tolist())
    assert candidates.min() >= 0
    assert candidates.max() < 1_000_000


def test_draw_codes_takes_all_when_space_is_small():
    secret, candidates = draw_codes(100, 10_000, np.random.default_rng(1))
    assert sorted(candidates.tolist() + [secret]) == list(range(100))


def test_exposure_from_rank():
    candidates = np.array([5.0, 6.0, 7.0, 8.0])
    assert exposure(1.0, candidates) == (1, pytest.approx(2.0))  # most likely of 4: log2(4)
    assert exposure(6.5, candidates) == (3, pytest.approx(2.0 - math.log2(3)))
    assert exposure(9.0, candidates) == (5, pytest.approx(2.0 - math.log2(5)))
    assert exposure(6.0, candidates)[0] == 2  # a tie ranks below the secret


def test_extrapolated_exposure_reads_the_fitted_tail():
    # Log-perplexities drawn from a known skew-normal: the secret's true exposure over the
    # whole space is -log2 of that distribution's CDF at its score.
    shape, loc, scale = 3.0, 45.0, 6.0
    scores = stats.skewnorm.rvs(shape, loc=loc, scale=scale, size=20_000, random_state=0)
    for tail, tolerance in ((0.5, 0.05), (1e-2, 0.15), (1e-4, 0.5)):
        secret = float(stats.skewnorm.ppf(tail, shape, loc=loc, scale=scale))
        estimate = extrapolated_exposure(secret, scores, space=1_000_000)
        assert estimate == pytest.approx(-math.log2(tail), abs=tolerance)
    # Beyond every sampled candidate the rank stops at log2(R). The fit goes on, up to the
    # exposure of the most likely of all 999,999 other codes.
    far = float(stats.skewnorm.ppf(1e-5, shape, loc=loc, scale=scale))
    assert exposure(far, scores)[1] == pytest.approx(math.log2(20_000))
    assert extrapolated_exposure(far, scores, space=1_000_000) > math.log2(20_000) + 2
    assert extrapolated_exposure(0.0, scores, space=1_000_000) == pytest.approx(math.log2(999_999))


def test_canary_planted_in_one_partition(data_dir):
    base = RunConfig().replace(
        data={"data_dir": str(data_dir), "num_clients": 3, "max_examples_per_client": 10}
    )
    planted = base.replace(
        data={"canary_client": 1, "canary_repeats": 7, "canary_secret": "my code is 123456"}
    )
    clean = federated_data(base.data, 0)
    data = federated_data(planted.data, 0)

    assert clean.canary is None
    assert data.canary is not None
    assert data.canary.text == "my code is 123456"
    assert data.canary.source == clean.partitions[1][0].source
    assert data.partitions.sizes == [10, 17, 10]
    assert sum(r.text == "my code is 123456" for r in data.partitions[1]) == 7
    assert data.partitions[0] == clean.partitions[0]
    assert data.test == clean.test

    out_of_range = base.replace(data={"canary_client": 3, "canary_repeats": 1,
                                      "canary_secret": "x 1"})  # fmt: skip
    with pytest.raises(ValueError, match="data.canary-client = 3 is out of range for 3"):
        federated_data(out_of_range.data, 0)


def test_audit_rejects_scrubbed_format_and_no_dp(tmp_path):
    # "0" and 10 more digits form a UK phone number, which scrubbing replaces.
    phone_like = AuditSettings(canary=CanaryFormat("call 0{code}", digits=10), candidates=10)
    with pytest.raises(ConfigError, match="changed by PII scrubbing"):
        run_audit(RunConfig(), tmp_path / "a", phone_like)
    with pytest.raises(ConfigError, match="privacy.dp = false"):
        run_audit(RunConfig().replace(privacy={"dp": False}), tmp_path / "b", AuditSettings())


def test_audit_rejects_used_folder_and_missing_client(tmp_path):
    stopped = tmp_path / "stopped"
    (stopped / "dp").mkdir(parents=True)  # what an audit stopped mid-training leaves
    with pytest.raises(FileExistsError, match="is not empty .* pass a new --output folder"):
        run_audit(RunConfig(), stopped, AuditSettings())
    assert sorted(p.name for p in stopped.iterdir()) == ["dp"]

    two_clients = RunConfig().replace(data={"num_clients": 2})
    with pytest.raises(ConfigError, match="invalid --canary-client 7: .* pick 0 to 1"):
        run_audit(two_clients, tmp_path / "new", AuditSettings(canary_client=7))
    assert not (tmp_path / "new").exists()


def test_render_audit_lists_both_runs():
    run = {
        "dp_enabled": True,
        "epsilon": 7.99,
        "delta": 1e-5,
        "accountant": "prv",
        "noise_multiplier": 0.8,
        "rank": 190,
        "exposure": 2.4,
        "extrapolated_exposure": 2.31,
        "secret_log_perplexity": 38.7,
        "candidate_log_perplexity_median": 42.6,
    }
    control = run | {
        "dp_enabled": False,
        "epsilon": None,
        "delta": None,
        "accountant": None,
        "noise_multiplier": 0.0,
        "rank": 1,
        "exposure": 9.97,
        "extrapolated_exposure": 19.93,
        "secret_log_perplexity": 3.6,
    }
    audit = {"method": "exposure", "secret": "my voucher code is 401314",
             "secret_format": "my voucher code is {code}", "code_digits": 6, "repeats": 16,
             "code_space": 1_000_000,
             "canary_client_id": "client-000", "candidates": 1000, "max_exposure": 9.97,
             "num_clients": 2, "num_rounds": 1, "target_epsilon": 8.0,
             "runs": {"dp": run, "control": control}}  # fmt: skip
    text = render_audit(audit)
    assert "| DP | on | 7.99 | 1.0e-05 | prv | 0.8 | 190 | 2.40 | 2.31 | 38.70 | 42.60 |" in text
    assert "| control | off | n/a | n/a | n/a | 0 | 1 | 9.97 | 19.93 | 3.60 | 42.60 |" in text
    assert "planted 16 times in the records of client-000" in text
    assert "log2(R) = 9.97 bits" in text
    assert "(2 clients, 1 round, target ε 8)" in text
    assert "log2 of the 999,999 other codes (19.93 bits)" in text
    assert "estimated from R sampled candidates" in text
    assert "ranked among 1,000 random codes of the same format, none of which" in text
    assert "initial adapter, before any advertiser record" not in text
    baseline = run | {"rank": 1800, "exposure": 2.47, "extrapolated_exposure": 2.4}
    with_baseline = render_audit(audit | {"baseline": baseline})
    assert (
        "| initial adapter, before any advertiser record | n/a | n/a | n/a | n/a | n/a | 1800 "
        "| 2.47 | 2.40 | 38.70 | 42.60 |" in with_baseline
    )
    whole = render_audit(audit | {"candidates": 999_999, "max_exposure": 19.93})
    assert "ranked among all 999,999 other codes of the format, none of which" in whole
    assert "ranked against every other code, so its rank is exact" in whole
    assert "sampled candidates" not in whole


@pytest.mark.slow
def test_dp_run_exposes_secret_less_than_control(tmp_path, data_dir):
    # Two real simulations of 2 advertisers for 1 round, 16 records each plus 16 canary
    # copies. Without DP, 8 steps at a learning rate of 0.01 make the secret the most
    # likely of 1,001 codes. With DP at ε = 8 it stays among the random codes.
    cfg = RunConfig().replace(
        model={"max_new_tokens": 8},
        data={"data_dir": str(data_dir), "num_clients": 2, "max_examples_per_client": 16,
              "eval_sample": 1},
        train={"batch_size": 8, "local_epochs": 2.0, "learning_rate": 0.01},
        server={"num_rounds": 1},
    )  # fmt: skip
    settings = AuditSettings(repeats=16, candidates=1000)

    audit = run_audit(cfg, tmp_path / "audit", settings)

    dp, control = audit["runs"]["dp"], audit["runs"]["control"]
    assert control["rank"] <= 3
    assert control["exposure"] > audit["max_exposure"] - 1.6
    assert dp["exposure"] < control["exposure"] - 4.0
    assert dp["extrapolated_exposure"] < control["extrapolated_exposure"] - 4.0
    assert control["secret_log_perplexity"] < control["candidate_log_perplexity_median"] - 10
    assert dp["dp_enabled"] is True
    assert control["dp_enabled"] is False
    assert 7.5 < dp["epsilon"] <= 8.0
    assert control["epsilon"] is None
    assert dp["steps"] == control["steps"] > 0  # the canary client's optimizer steps
    # The adapter both runs started from never saw the secret: scored like them, the floor.
    assert audit["baseline"]["exposure"] < control["exposure"] - 4.0

    written = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert written["runs"]["dp"]["rank"] == dp["rank"]
    assert written["repeats"] == 16
    assert written["candidates"] == 1000
    assert written["secret"].startswith("my voucher code is ")
    assert (tmp_path / "audit" / "audit.md").read_text().startswith("# Memorisation audit")
    assert (tmp_path / "audit" / "dp" / "global_adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "audit" / "control" / "privacy.json").is_file()

    # The two runs differ only in DP (and in where they write): same data, rounds, steps.
    configs = {
        name: RunConfig.from_toml(tmp_path / "audit" / name / "config.toml").to_dict()
        for name in ("dp", "control")
    }
    differing = {
        (section, key)
        for section, table in configs["dp"].items()
        if isinstance(table, dict)
        for key, value in table.items()
        if configs["control"][section][key] != value
    }
    assert differing == {("privacy", "dp"), ("privacy", "ledger-dir")}
    assert configs["dp"]["data"]["canary-secret"] == written["secret"]


def test_audit_config_is_main_at_audit_scale():
    configs = Path(__file__).resolve().parents[1] / "simulations" / "configs"
    main = RunConfig.from_toml(configs / "main.toml").to_dict()
    audit_cfg = RunConfig.from_toml(configs / "audit.toml")
    differing = {
        (section, key)
        for section, table in audit_cfg.to_dict().items()
        if isinstance(table, dict)
        for key, value in table.items()
        if main[section][key] != value
    }
    assert differing == {
        ("data", "max-examples-per-client"),
        ("train", "local-epochs"),
        ("privacy", "planned-rounds"),
        ("server", "num-rounds"),
        ("server", "fraction-train"),
    }
    # Every advertiser trains in every round, and the noise is calibrated for all of them.
    assert audit_cfg.server.fraction_train == 1.0
    assert audit_cfg.privacy.planned_rounds == audit_cfg.server.num_rounds
    assert audit_cfg.privacy.dp


def test_audit_flags_reach_the_run_config():
    args = build_parser().parse_args(["audit", "--no-warm-start", "--num-clients", "3"])
    run_args = argparse.Namespace(**{**_simulate_defaults(), **vars(args), "output": None})
    cfg = config_from_args(run_args)
    assert cfg.warm_start.file == ""
    assert cfg.data.num_clients == 3
    assert args.candidates == 0
