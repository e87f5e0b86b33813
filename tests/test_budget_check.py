"""A client checks its budget at the sampling rate of the round it is about to train."""

from __future__ import annotations

import json
import logging

from local_grid import LocalGrid, dp_run_config

from client.app import build_client_app
from client.ledger import PrivacyEvent, PrivacyLedger
from server.loop import run_rounds

SIGMA = 1.0
CALIBRATED_RATE = 0.05  # the rate σ was calibrated for, when the client had 160 records


def test_budget_check_uses_current_rate(tmp_path, data_dir, caplog):
    # 16 records at batch size 8 make q = 0.5 and one step for half an epoch.
    run_dir = tmp_path / "run"
    cfg = dp_run_config(run_dir, data_dir, num_clients=2, num_rounds=1)
    # A ledger from an earlier run, calibrated at a tenth of today's rate and spent to the
    # point where one more step fits at that rate but not at today's.
    ledger = PrivacyLedger.open(
        run_dir / "ledgers" / "client-000.json",
        client_id="client-000",
        accountant="rdp",
        target_epsilon=8.0,
        target_delta=1e-5,
    )
    ledger.noise_multiplier, ledger.sample_rate = SIGMA, CALIBRATED_RATE
    ledger.events, ledger.rounds_joined = [PrivacyEvent(SIGMA, 0.5, 4)], [0]
    assert ledger.epsilon(PrivacyEvent(SIGMA, CALIBRATED_RATE, 1)) <= 8.0
    assert ledger.epsilon(PrivacyEvent(SIGMA, 0.5, 1)) > 8.0
    ledger.save()
    spent = ledger.epsilon()

    with caplog.at_level(logging.WARNING):
        run_rounds(LocalGrid(build_client_app(cfg), 2), cfg, run_dir)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["num_declined"] == 1
    assert rows[0]["num_trained"] == 1
    stored = json.loads((run_dir / "ledgers" / "client-000.json").read_text())
    assert stored["declined_rounds"] == [1]
    assert stored["epsilon"] == spent <= 8.0
    assert "now samples at rate 0.5, above the 0.05 its noise was calibrated for" in caplog.text
