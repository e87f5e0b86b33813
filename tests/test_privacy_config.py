"""Privacy settings: accountant choice at high ε, PII scrubbing keys, secure mode."""

from __future__ import annotations

import logging
import types

import pytest

from client.ledger import PrivacyEvent, PrivacyLedger
from client.pii import KINDS
from client.runtime import check_secure_mode, ledger_accountant
from common import secure_rng
from common.cli import build_parser, config_from_args
from common.config import PII_KINDS, ConfigError, PrivacyConfig, RunConfig


def test_privacy_defaults():
    privacy = PrivacyConfig()
    assert privacy.accountant == "prv"
    assert privacy.accountant_in_use == "prv"
    assert privacy.scrub_pii is True
    assert privacy.scrub_kind_set == frozenset({"email", "phone", "card", "url"})
    assert privacy.report_pii_counts is False
    assert privacy.secure_mode is False


def test_pii_kinds_match_scrubber():
    assert set(PII_KINDS) == set(KINDS)


@pytest.mark.parametrize(
    "accountant, target_epsilon, expected",
    [
        ("prv", 8.0, "prv"),
        ("prv", 10.0, "prv"),
        ("prv", 10.5, "rdp"),
        ("rdp", 4.0, "rdp"),
        ("rdp", 30.0, "rdp"),
    ],
)
def test_accountant_in_use(accountant, target_epsilon, expected):
    privacy = PrivacyConfig(accountant=accountant, target_epsilon=target_epsilon)
    assert privacy.accountant_in_use == expected
    assert privacy.accountant == accountant  # the request stays as written


def test_prv_above_ten_switches_with_warning(caplog, tmp_path):
    privacy = PrivacyConfig(accountant="prv", target_epsilon=12.0)
    ledger_accountant.cache_clear()  # it warns once per process and config
    with caplog.at_level(logging.WARNING, logger="client.runtime"):
        accountant = ledger_accountant(privacy)
    assert accountant == "rdp"
    assert "composing epsilon with rdp instead" in caplog.text

    # A new ledger opened the way the ClientApp opens it composes with RDP.
    ledger = PrivacyLedger.open(
        tmp_path / "c1.json",
        client_id="c1",
        accountant=accountant,
        target_epsilon=privacy.target_epsilon,
        target_delta=privacy.target_delta,
    )
    sigma = ledger.calibrate(sample_rate=0.1, planned_steps=50)
    ledger.record_round(1, PrivacyEvent(sigma, 0.1, 50))
    assert ledger.accountant == "rdp"
    assert ledger.epsilon() == pytest.approx(12.0, rel=0.01)


def test_accountant_below_ten_logs_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="client.runtime"):
        assert ledger_accountant(PrivacyConfig(target_epsilon=9.5)) == "prv"
    assert caplog.text == ""


@pytest.mark.parametrize("kinds", ["email,ssn", "", " , "])
def test_invalid_scrub_kinds_rejected(kinds):
    with pytest.raises(ConfigError, match="privacy.scrub-kinds"):
        RunConfig.from_dict({"privacy": {"scrub-kinds": kinds}})


def test_scrubbing_off_selects_no_kinds():
    cfg = RunConfig.from_dict({"privacy": {"scrub-pii": False, "scrub-kinds": ""}})
    assert cfg.privacy.scrub_kind_set == frozenset()
    partial = RunConfig.from_dict({"privacy": {"scrub-kinds": "email, url"}})
    assert partial.privacy.scrub_kind_set == frozenset({"email", "url"})


def test_canary_needs_secret():
    with pytest.raises(ConfigError, match="data.canary-secret"):
        RunConfig.from_dict({"data": {"canary-repeats": 3}})
    with pytest.raises(ConfigError, match="data.canary-repeats = -1"):
        RunConfig.from_dict({"data": {"canary-repeats": -1, "canary-secret": "code 1"}})
    cfg = RunConfig.from_dict({"data": {"canary-repeats": 3, "canary-secret": "code 123"}})
    assert cfg.data.canary_repeats == 3


def test_privacy_flags_reach_config():
    args = build_parser().parse_args(
        ["simulate", "--accountant", "rdp", "--production", "--no-scrub-pii"]
    )
    cfg = config_from_args(args)
    assert cfg.privacy.accountant == "rdp"
    assert cfg.privacy.production is True
    assert cfg.privacy.secure_mode is True
    assert cfg.privacy.scrub_pii is False
    default = config_from_args(build_parser().parse_args(["simulate"]))
    assert default.privacy.production is False
    assert default.privacy.scrub_pii is True


def test_production_config_yields_secure_mode(tmp_path):
    cfg = RunConfig.from_dict({"privacy": {"production": True}})
    assert cfg.privacy.secure_mode is True
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml(), encoding="utf-8")
    assert RunConfig.from_toml(path).privacy.secure_mode is True


# --- secure mode start-up check -------------------------------------------------------


def test_secure_mode_check_passes_with_os_csprng():
    check_secure_mode(PrivacyConfig(production=True))
    check_secure_mode(PrivacyConfig())  # secure mode off: nothing to check
    check_secure_mode(PrivacyConfig(dp=False, production=True))


def _fail_urandom(monkeypatch) -> None:
    def urandom(size: int) -> bytes:
        raise NotImplementedError("no randomness source")

    # Replaces os only inside common.secure_rng, so the rest of the process keeps urandom.
    monkeypatch.setattr(secure_rng, "os", types.SimpleNamespace(urandom=urandom))


def test_secure_mode_check_names_failed_urandom(monkeypatch):
    _fail_urandom(monkeypatch)
    with pytest.raises(RuntimeError, match="privacy.production = true needs .*os.urandom failed"):
        check_secure_mode(PrivacyConfig(production=True))
    with pytest.raises(RuntimeError, match="privacy.secure-mode = true needs"):
        check_secure_mode(PrivacyConfig(secure_mode=True))
    # Advertiser-level noise draws from the same generator when record-level DP is off.
    with pytest.raises(RuntimeError, match="privacy.production = true needs"):
        check_secure_mode(PrivacyConfig(dp=False, production=True))
    check_secure_mode(PrivacyConfig())


def test_simulate_production_fails_before_training(monkeypatch, capsys, tmp_path):
    from common.cli import main

    _fail_urandom(monkeypatch)
    code = main(
        ["simulate", "--production", "--data-dir", str(tmp_path), "--output", str(tmp_path / "run")]
    )
    assert code == 1
    assert "os.urandom failed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
