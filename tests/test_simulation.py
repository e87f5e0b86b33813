"""Real Flower simulations on the E2E files, and the generate and evaluate commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from client.ledger import PrivacyEvent, PrivacyLedger

pytestmark = pytest.mark.slow

TINY_CONFIG = """\
seed = 0
[model]
max-new-tokens = 20
[data]
eval-sample = 3
[train]
batch-size = 8
local-epochs = 1.0
[warm-start]
file = "trainset_subset.csv"
max-examples = 16
epochs = 1.0
"""


def fedads(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "common.cli", *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"fedads {args[0]} failed:\n{result.stdout}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    path.write_text(TINY_CONFIG, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def two_client_run(tmp_path_factory, data_dir, tiny_config) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "two-clients"
    fedads(
        "simulate",
        "--config", str(tiny_config),
        "--data-dir", str(data_dir),
        "--output", str(run_dir),
        "--num-rounds", "1",
        "--num-clients", "2",
        "--max-examples-per-client", "16",
    )  # fmt: skip
    return run_dir


def test_simulation_writes_every_file_of_run_folder(two_client_run):
    expected = [
        "config.toml",
        "metrics.jsonl",
        "privacy.json",
        "report.md",
        "loss.png",
        "epsilon.png",
        "heldout.csv",
        "global_adapter/adapter_config.json",
        "global_adapter/adapter_model.safetensors",
        "ledgers/client-000.json",
        "ledgers/client-001.json",
        "warm_start/adapter_model.safetensors",
        "warm_start/warm_start.json",
    ]
    missing = [name for name in expected if not (two_client_run / name).is_file()]
    assert not missing


def test_simulation_metrics_and_privacy(two_client_run):
    rows = [json.loads(line) for line in (two_client_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert row["round"] == 1
    assert row["num_trained"] == 2
    assert row["bytes_up"] == row["bytes_down"] > 0
    assert row["eval_loss"] > 0
    assert 0 <= row["bleu"] <= 100
    privacy = json.loads((two_client_run / "privacy.json").read_text())
    assert privacy["unit"] == "record"
    assert privacy["accountant"] == "prv"
    assert privacy["warm_start"]["num_records"] == 16
    assert privacy["warm_start"]["dp"] is False
    assert set(privacy["clients"]) == {"client-000", "client-001"}
    for client in privacy["clients"].values():
        # One round was planned, so each client spends its whole budget in it.
        assert 7.5 < client["epsilon"] <= 8.0
        assert client["sample_rate"] == pytest.approx(0.5)
        assert client["steps"] == 2
        assert client["rounds_joined"] == [1]
    assert row["max_epsilon"] == pytest.approx(
        max(c["epsilon"] for c in privacy["clients"].values())
    )


def test_report_names_privacy_unit_and_clients(two_client_run):
    report = (two_client_run / "report.md").read_text()
    assert "client-000" in report
    assert "not protected" in report.lower()


def test_generate_prints_requested_number_of_texts(two_client_run):
    result = fedads(
        "generate",
        "--run", str(two_client_run),
        "--source", "name[The Eagle], eatType[coffee shop], food[French]",
        "-n", "2",
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 2
    sampled = fedads(
        "generate",
        "--run", str(two_client_run),
        "--source", "name[The Eagle], eatType[coffee shop], food[French]",
        "-n", "2", "--sample", "--temperature", "1.2",
    )  # fmt: skip
    assert len([line for line in sampled.stdout.splitlines() if line.strip()]) == 2
    bad = fedads("generate", "--run", str(two_client_run), "--source", "x", "--sample",
                 "--temperature", "0", check=False)  # fmt: skip
    assert bad.returncode != 0
    assert "invalid --temperature 0.0" in bad.stderr


def test_evaluate_writes_scores(two_client_run):
    result = fedads("evaluate", "--run", str(two_client_run), "--limit", "3")
    scores = json.loads((two_client_run / "eval.json").read_text())
    assert scores["num_sources"] == 3
    assert 0 <= scores["bleu"] <= 100
    assert 0 <= scores["slot_error_rate"] <= 1
    assert "BLEU" in result.stdout
    assert "slot error rate" in result.stdout


def test_ledger_composes_and_exhausted_client_declines(tmp_path, data_dir, tiny_config):
    run_dir = tmp_path / "run"
    exhausted = PrivacyLedger.open(
        run_dir / "ledgers" / "client-000.json",
        client_id="client-000",
        accountant="prv",
        target_epsilon=8.0,
        target_delta=1e-5,
    )
    exhausted.noise_multiplier, exhausted.sample_rate = 0.5, 1.0
    exhausted.record_round(0, PrivacyEvent(0.5, 1.0, 50))  # a previous run spent the budget
    fedads(
        "simulate",
        "--config", str(tiny_config),
        "--data-dir", str(data_dir),
        "--output", str(run_dir),
        "--num-rounds", "2",
        "--num-clients", "3",
        "--max-examples-per-client", "16",
    )  # fmt: skip
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["num_declined"] for r in rows] == [1, 1]
    assert [r["num_trained"] for r in rows] == [2, 2]
    # The exhausted client's ε (far above the target) is the largest in every round.
    assert rows[0]["max_epsilon"] == rows[1]["max_epsilon"] > 8.0

    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["clients"]["client-000"]["declined_rounds"] == [1, 2]
    ledger = json.loads((run_dir / "ledgers" / "client-001.json").read_text())
    assert [e["steps"] for e in ledger["events"]] == [2, 2]
    assert ledger["rounds_joined"] == [1, 2]
    # Two rounds compose to the planned budget, not to one round's ε.
    assert 7.5 < ledger["epsilon"] <= 8.0
    first_round = PrivacyLedger.open(
        tmp_path / "first.json",
        client_id="client-001",
        accountant="prv",
        target_epsilon=8.0,
        target_delta=1e-5,
    )
    first_round.events = [PrivacyEvent(**ledger["events"][0])]
    assert first_round.epsilon() < ledger["epsilon"] - 1.0
    assert privacy["clients"]["client-001"]["epsilon"] == pytest.approx(ledger["epsilon"])


def test_resume_before_first_checkpoint(tmp_path, two_client_run):
    run_dir = tmp_path / "killed-early"
    (run_dir / "warm_start").mkdir(parents=True)
    (run_dir / "config.toml").write_bytes((two_client_run / "config.toml").read_bytes())
    for name in ("adapter_model.safetensors", "adapter_config.json", "warm_start.json"):
        (run_dir / "warm_start" / name).write_bytes((two_client_run / "warm_start" / name).read_bytes())
    # A metrics line of the round in flight, cut short by the kill.
    (run_dir / "metrics.jsonl").write_text('{"round": 1, "num_trai', encoding="utf-8")

    result = fedads("simulate", "--resume", str(run_dir))

    assert "running it from round 1" in result.stderr
    assert "warm_start: using the adapter in" in result.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1]
    assert rows[0]["num_trained"] == 2
    assert (run_dir / "report.md").is_file()


def test_missing_data_folder_fails_with_clear_message(tmp_path):
    result = fedads(
        "simulate",
        "--data-dir", str(tmp_path / "nowhere"),
        "--output", str(tmp_path / "run"),
        "--num-rounds", "1",
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "devset.csv" in result.stderr
