"""Privacy ledger: composition across rounds, persistence, budget enforcement, calibration."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant

from client.ledger import BudgetExceeded, PrivacyEvent, PrivacyLedger


def _open(path, **overrides):
    settings = {"client_id": "c1", "accountant": "prv", "target_epsilon": 8.0, "target_delta": 1e-5}
    settings.update(overrides)
    return PrivacyLedger.open(path, **settings)


def test_epsilon_composes_across_rounds_and_reopen(tmp_path):
    path = tmp_path / "c1.json"
    event = PrivacyEvent(noise_multiplier=1.0, sample_rate=0.05, steps=20)
    ledger = _open(path)
    eps1 = ledger.record_round(1, event)
    reopened = _open(path)  # a new process in the next round
    eps2 = reopened.record_round(2, event)
    assert eps2 > eps1 > 0
    assert reopened.rounds_joined == [1, 2]
    assert reopened.steps == 40
    # The composed value equals one accountant run over both rounds, not one round's ε.
    single = _open(tmp_path / "single.json")
    single.events = [PrivacyEvent(1.0, 0.05, 40)]
    assert eps2 == pytest.approx(single.epsilon(), rel=1e-3)


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    ledger = _open(tmp_path / "c1.json")
    ledger.record_round(1, PrivacyEvent(1.0, 0.1, 5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c1.json"]
    data = json.loads((tmp_path / "c1.json").read_text())
    assert data["version"] == 1
    assert data["steps"] == 5
    assert data["epsilon"] > 0


def test_round_over_budget_is_declined_with_remaining_budget(tmp_path):
    ledger = _open(tmp_path / "c1.json", target_epsilon=1.0)
    ledger.record_round(1, PrivacyEvent(0.8, 0.2, 10))
    with pytest.raises(BudgetExceeded, match="remaining budget") as info:
        ledger.check_budget(PrivacyEvent(0.8, 0.2, 1000))
    assert "over the target 1" in str(info.value)


@pytest.mark.parametrize(
    "accountant, target_epsilon",
    [("prv", 1.0), ("prv", 8.0), ("prv", 10.0), ("rdp", 1.0), ("rdp", 8.0), ("rdp", 16.0)],
)
def test_calibrated_noise_reaches_target_within_one_percent(tmp_path, accountant, target_epsilon):
    # ε -> σ -> ε round trip. PRV stops at 10 because the ClientApp switches to RDP above.
    ledger = _open(tmp_path / "c1.json", accountant=accountant, target_epsilon=target_epsilon)
    sigma = ledger.calibrate(sample_rate=0.05, planned_steps=200)
    spent = ledger.epsilon(PrivacyEvent(sigma, 0.05, 200))
    assert spent <= target_epsilon
    assert spent == pytest.approx(target_epsilon, rel=0.01)


def test_calibration_is_fixed_after_first_round(tmp_path):
    ledger = _open(tmp_path / "c1.json")
    first = ledger.calibrate(sample_rate=0.05, planned_steps=100)
    assert ledger.calibrate(sample_rate=0.5, planned_steps=5) == first


def test_prv_and_rdp_agree_within_rdp_slack(tmp_path):
    ledger = _open(tmp_path / "c1.json")
    ledger.events = [PrivacyEvent(1.0, 0.05, 300)]
    prv = ledger.epsilon()
    rdp = RDPAccountant()
    rdp.history = [(1.0, 0.05, 300)]
    rdp_eps = rdp.get_epsilon(delta=1e-5)
    # RDP is an upper bound that is looser than PRV, by well under a factor of 2 here.
    assert prv <= rdp_eps
    assert rdp_eps < 1.5 * prv


def test_corrupt_ledger_is_reported_not_reset(tmp_path):
    path = tmp_path / "c1.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="unreadable.*deleting it would forget"):
        _open(path)


def test_stored_budget_wins_over_new_settings(tmp_path, caplog):
    path = tmp_path / "c1.json"
    _open(path, target_epsilon=2.0).record_round(1, PrivacyEvent(1.0, 0.1, 5))
    reopened = _open(path, target_epsilon=50.0)
    assert reopened.target_epsilon == 2.0
    assert "keeping its stored budget" in caplog.text


def test_ledger_keeps_its_accountant(tmp_path, caplog):
    path = tmp_path / "c1.json"
    event = PrivacyEvent(1.0, 0.05, 300)
    _open(path, accountant="rdp").record_round(1, event)

    reopened = _open(path, accountant="prv")  # e.g. the run config changed between runs
    assert reopened.accountant == "rdp"
    assert "accountant=rdp" in caplog.text
    rdp = RDPAccountant()
    rdp.history = [(1.0, 0.05, 300)]
    assert reopened.epsilon() == pytest.approx(rdp.get_epsilon(delta=1e-5), rel=1e-9)

    reopened.record_round(2, event)
    assert json.loads(path.read_text())["accountant"] == "rdp"


def test_ledger_survives_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "c1.json"
    ledger = _open(path)
    ledger.record_round(1, PrivacyEvent(1.0, 0.1, 5))
    before = path.read_bytes()

    # A crash after the new content is written and synced, before the rename.
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr("common.atomic.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ledger.record_round(2, PrivacyEvent(1.0, 0.1, 5))
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c1.json"]  # no temporary file left
    reopened = _open(path)
    assert reopened.rounds_joined == [1]
    assert reopened.steps == 5


def test_ledger_other_version_rejected(tmp_path):
    path = tmp_path / "c1.json"
    _open(path).record_round(1, PrivacyEvent(1.0, 0.1, 5))
    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="has version 99, expected 1: upgrade fedads"):
        _open(path)
