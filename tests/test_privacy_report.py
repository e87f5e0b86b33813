"""privacy.json from the server's recorder and its rendering in report.md."""

from __future__ import annotations

import json
import logging

import pytest

from common.config import RunConfig
from server.recorder import RunRecorder
from simulations.report import write_report


def _client_metrics(epsilon: float, *, accountant_id: int, secure_mode: int) -> dict:
    return {
        "num-examples": 40,
        "declined": 0,
        "epsilon": epsilon,
        "delta": 1e-5,
        "noise-multiplier": 0.9,
        "sample-rate": 0.2,
        "total-steps": 10,
        "accountant-id": accountant_id,
        "secure-mode": secure_mode,
    }


def _record_run(run_dir, cfg: RunConfig) -> dict:
    recorder = RunRecorder(run_dir, cfg)
    secure = int(cfg.privacy.secure_mode)
    recorder.update_client("adv-a", 1, _client_metrics(5.1, accountant_id=1, secure_mode=secure))
    recorder.update_client("adv-b", 1, {"num-examples": 0, "declined": 1})
    recorder.write_privacy()
    recorder.append_round(
        {
            "round": 1,
            "num_sampled": 2,
            "num_declined": 1,
            "train_loss": 3.0,
            "max_epsilon": recorder.max_epsilon(),
        }
    )
    return json.loads((run_dir / "privacy.json").read_text())


def test_privacy_json_fields(tmp_path):
    cfg = RunConfig().replace(
        privacy={"target_epsilon": 6.0, "clipping_norm": 0.5}, server={"num_rounds": 3}
    )
    privacy = _record_run(tmp_path, cfg)

    assert privacy["unit"] == "record"
    assert privacy["dp_enabled"] is True
    assert privacy["accountant"] == "prv"
    assert privacy["accountant_requested"] == "prv"
    assert privacy["accountant_note"] is None
    assert privacy["target_epsilon"] == 6.0
    assert privacy["delta"] == 1e-5
    assert privacy["clipping_norm"] == 0.5
    assert privacy["num_rounds"] == 3
    assert privacy["secure_mode"] is False
    assert privacy["secure_aggregation"] is False
    assert privacy["pii_scrubbing"] == {
        "enabled": True,
        "kinds": ["card", "email", "phone", "url"],
        "counts_sent_to_server": False,
        "replaced_total": None,
    }
    client = privacy["clients"]["adv-a"]
    assert client["epsilon"] == 5.1
    assert client["accountant"] == "rdp"  # the client's own ledger, reported by index
    assert client["noise_multiplier"] == 0.9
    assert client["sample_rate"] == 0.2
    assert client["steps"] == 10
    assert client["rounds_joined"] == [1]
    assert client["secure_mode"] is False
    assert privacy["clients"]["adv-b"]["declined_rounds"] == [1]

    not_protected = " ".join(privacy["not_protected"])
    assert "no secure aggregation" in not_protected
    # What every run discloses to the server, whatever the settings.
    assert "The set of clients that take part in each round" in not_protected
    assert "aggregate adapter of every round is visible to all participants" in not_protected
    assert "(training loss, steps, training time, ε spent" in not_protected
    assert "Secure mode was off" in not_protected
    assert "covers one record" in not_protected
    assert "matches patterns only" in not_protected


def test_high_epsilon_prv_is_reported_as_rdp(tmp_path, caplog):
    cfg = RunConfig().replace(privacy={"target_epsilon": 12.0})
    with caplog.at_level(logging.WARNING, logger="server.recorder"):
        privacy = _record_run(tmp_path, cfg)
    assert "clients compose epsilon with rdp" in caplog.text
    assert privacy["accountant"] == "rdp"
    assert privacy["accountant_requested"] == "prv"
    assert "inaccurate above ε ≈ 10" in privacy["accountant_note"]


def test_report_privacy_section(tmp_path):
    cfg = RunConfig().replace(privacy={"target_epsilon": 12.0, "clipping_norm": 0.5})
    _record_run(tmp_path, cfg)
    text = write_report(tmp_path).read_text()
    section = text[text.index("## Privacy") : text.index("## What is not protected")]

    assert "- unit: `record`" in section
    assert "- accountant: `rdp` (requested `prv`)" in section
    assert "- δ: 1.0e-05" in section
    assert "- target ε: 12.00" in section
    assert "- clipping norm: 0.5" in section
    assert "- rounds planned: 4" in section
    assert "- secure mode (cryptographic noise): off" in section
    assert "- secure aggregation: off" in section
    assert "- PII scrubbing: on (card, email, phone, url), counts kept on the clients" in section
    assert "NOTE: prv was requested, but it is inaccurate above ε ≈ 10" in section
    assert "| adv-a | 5.10 | 1.0e-05 | rdp | 0.9 | 0.2 | 10 | 1 | none |" in section
    assert "| adv-b | 0.00 |" in section

    unprotected = text[text.index("## What is not protected") : text.index("## Configuration")]
    assert "- The run used no secure aggregation" in unprotected
    assert "- Secure mode was off" in unprotected
    assert "- The (ε, δ) guarantee covers one record." in unprotected


def test_report_production_run(tmp_path):
    cfg = RunConfig().replace(privacy={"production": True, "report_pii_counts": True})
    recorder = RunRecorder(tmp_path, cfg)
    metrics = _client_metrics(3.0, accountant_id=0, secure_mode=1) | {"pii-replaced": 7}
    recorder.update_client("adv-a", 1, metrics)
    recorder.update_client("adv-b", 1, _client_metrics(2.0, accountant_id=0, secure_mode=0))
    recorder.write_privacy()
    recorder.append_round({"round": 1, "train_loss": 3.0})
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    assert privacy["secure_mode"] is True
    assert privacy["production"] is True
    assert privacy["pii_scrubbing"]["replaced_total"] == 7

    text = write_report(tmp_path).read_text()
    assert "- secure mode (cryptographic noise): on" in text
    assert "7 replacements reported to the server" in text
    assert "NOTE: clients adv-b reported training without secure mode" in text
    assert "Secure mode was off" not in text
    assert "exact number of PII values it replaced" in text


def test_report_dp_off_lists_memorisation(tmp_path):
    cfg = RunConfig().replace(privacy={"dp": False, "scrub_pii": False})
    recorder = RunRecorder(tmp_path, cfg)
    recorder.update_client("adv-a", 1, {"num-examples": 10, "declined": 0, "secure-mode": 0})
    recorder.write_privacy()
    recorder.append_round({"round": 1})
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    assert privacy["secure_mode"] is False
    assert privacy["pii_scrubbing"]["enabled"] is False

    text = write_report(tmp_path).read_text()
    assert "**Differential privacy was OFF for this run.**" in text
    assert "- PII scrubbing: off" in text
    assert "Differential privacy was off: nothing bounds" in text
    assert "PII scrubbing was off" in text


@pytest.mark.parametrize("index", [-1, 2, 99])
def test_unknown_accountant_index_reads_as_run_accountant(tmp_path, index):
    recorder = RunRecorder(tmp_path, RunConfig())
    recorder.update_client("adv-a", 1, _client_metrics(1.0, accountant_id=index, secure_mode=0))
    assert recorder.privacy_summary()["clients"]["adv-a"]["accountant"] == "prv"


def test_secure_mode_advertiser_noise_only(tmp_path):
    # Record-level DP off, advertiser-level DP on: the server's noise follows production.
    for production in (True, False):
        cfg = RunConfig().replace(
            privacy={"dp": False, "production": production},
            advertiser_dp={"enabled": True, "target_epsilon": 8.0},
            server={"weighting": "uniform"},
        )
        privacy = _record_run(tmp_path / str(production), cfg)
        assert privacy["secure_mode"] is production
        not_protected = " ".join(privacy["not_protected"])
        assert ("Secure mode was off" in not_protected) is not production


def test_non_dp_clients_report_no_epsilon(tmp_path):
    recorder = RunRecorder(tmp_path, RunConfig().replace(privacy={"dp": False}))
    for server_round in (1, 2):
        recorder.update_client("adv-a", server_round, {"num-examples": 40, "steps": 5})
    recorder.write_privacy()
    client = json.loads((tmp_path / "privacy.json").read_text())["clients"]["adv-a"]
    # Without DP there is no guarantee: null, not an ε of 0 that reads as perfect privacy.
    for key in ("epsilon", "delta", "accountant", "noise_multiplier", "sample_rate"):
        assert client[key] is None, key
    assert client["steps"] == 10
    assert client["rounds_joined"] == [1, 2]
