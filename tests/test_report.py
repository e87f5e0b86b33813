"""Tests for the run report: metrics loading, plots and the Markdown report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulations.report import load_metrics, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

METRICS: list[dict[str, Any]] = [
    {"round": 1, "num_sampled": 3, "num_replies": 3, "num_declined": 0, "train_loss": 3.21,
     "eval_loss": 3.05, "bleu": None, "rouge_l": None, "max_epsilon": 2.47,
     "bytes_up": 3 * 150_000, "bytes_down": 3 * 150_000, "round_time_s": 4.2},
    {"round": 2, "num_sampled": 3, "num_replies": 3, "num_declined": 0, "train_loss": 2.64,
     "eval_loss": 2.58, "bleu": 12.5, "rouge_l": 31.0, "max_epsilon": 4.81,
     "bytes_up": 3 * 150_000, "bytes_down": 3 * 150_000, "round_time_s": 4.0},
    {"round": 3, "num_sampled": 3, "num_replies": 2, "num_declined": 1, "train_loss": 2.31,
     "eval_loss": None, "bleu": 17.25, "rouge_l": 35.5, "max_epsilon": 6.93,
     "bytes_up": 2 * 150_000, "bytes_down": 3 * 150_000, "round_time_s": 3.9},
]


def _privacy(dp_enabled: bool = True) -> dict[str, Any]:
    return {
        "unit": "record",
        "accountant": "prv",
        "target_epsilon": 8.0,
        "delta": 1e-05,
        "dp_enabled": dp_enabled,
        "clients": {
            "the-eagle": {"epsilon": 6.93, "delta": 1e-05, "accountant": "prv",
                          "noise_multiplier": 1.1, "sample_rate": 0.02, "steps": 150,
                          "rounds_joined": [1, 2, 3], "declined_rounds": []},
            "cotto": {"epsilon": 4.12, "delta": 1e-05, "accountant": "prv",
                      "noise_multiplier": 1.3, "sample_rate": 0.05, "steps": 60,
                      "rounds_joined": [1, 2], "declined_rounds": [3]},
        },
    }


def _write_run(
    run_dir: Path,
    metrics: list[dict[str, Any]],
    privacy: dict[str, Any],
    evaluation: dict[str, Any] | None = None,
) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text('num-rounds = 3\nbase-model = "minilm"\n')
    lines = [json.dumps(row) for row in metrics]
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    (run_dir / "privacy.json").write_text(json.dumps(privacy))
    if evaluation is not None:
        (run_dir / "eval.json").write_text(json.dumps(evaluation))
    return run_dir


def test_report_writes_files_and_plots(tmp_path: Path) -> None:
    evaluation = {"bleu": 18.4, "rouge_l": 36.2, "slot_error_rate": 0.125,
                  "num_sources": 40, "test_file": "e2e/devset.csv"}
    run_dir = _write_run(tmp_path / "run", METRICS, _privacy(), evaluation)

    report_path = write_report(run_dir)

    assert report_path == run_dir / "report.md"
    for name in ("loss.png", "bleu.png", "epsilon.png"):
        data = (run_dir / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 5_000, name
    text = report_path.read_text()
    for name in ("loss.png", "bleu.png", "epsilon.png"):
        assert f"]({name})" in text


def test_report_summary_values(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path / "run", METRICS, _privacy())
    text = write_report(run_dir).read_text()

    assert "| rounds completed | 3 |" in text
    assert "| clients in the privacy ledger | 2 |" in text
    assert "| final train loss | 2.31 (round 3) |" in text
    # Round 3 has no eval loss, so the last one comes from round 2.
    assert "| final eval loss | 2.58 (round 2) |" in text
    assert "| final BLEU (server evaluation) | 17.25 (round 3) |" in text
    assert "| max ε / target ε | 6.93 / 8.00 |" in text
    assert "| declines, summed over rounds | 1 |" in text
    # 8 uploads and 9 downloads of 150,000 bytes.
    assert "| bytes up / down | 1.1 MiB / 1.3 MiB |" in text
    assert "No test-set evaluation (eval.json)" in text
    assert "num-rounds = 3" in text


def test_report_privacy_section(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path / "run", METRICS, _privacy())
    text = write_report(run_dir).read_text()

    assert "- unit: `record`" in text
    assert "Record-level DP at each advertiser." in text
    assert "- accountant: `prv`" in text
    assert "- δ: 1.0e-05" in text
    assert "- target ε: 8.00" in text
    assert "| the-eagle | 6.93 | 1.0e-05 | prv | 1.1 | 0.02 | 150 | 1-3 | none |" in text
    assert "| cotto | 4.12 | 1.0e-05 | prv | 1.3 | 0.05 | 60 | 1-2 | 3 |" in text
    assert "DP was OFF" not in text

    assert "## What is not protected" in text
    assert "number of training examples each one reports, are visible to the server" in text
    assert "aggregate adapter of every round is visible to all participants" in text


def test_report_flags_epsilon_over_target(tmp_path: Path) -> None:
    privacy = _privacy()
    privacy["clients"]["cotto"]["epsilon"] = 11.5
    run_dir = _write_run(tmp_path / "run", METRICS, privacy)
    text = write_report(run_dir).read_text()

    assert "| cotto | 11.50 (over target) |" in text
    assert "PRV accountant is inaccurate above ε ≈ 10" in text


def test_report_dp_off(tmp_path: Path) -> None:
    metrics = [row | {"max_epsilon": None} for row in METRICS]
    privacy = _privacy(dp_enabled=False)
    for entry in privacy["clients"].values():
        entry["epsilon"] = None
    run_dir = _write_run(tmp_path / "run", metrics, privacy)
    (run_dir / "epsilon.png").write_bytes(PNG_SIGNATURE)  # left over from an earlier report

    text = write_report(run_dir).read_text()

    assert "**Differential privacy was OFF for this run.**" in text
    assert "| max ε / target ε | DP off |" in text
    assert "DP was off, so there is no ε to plot." in text
    assert not (run_dir / "epsilon.png").exists()
    assert (run_dir / "loss.png").is_file()


def test_report_tolerates_nulls_and_missing_files(tmp_path: Path) -> None:
    metrics: list[dict[str, Any]] = [{"round": 1, "train_loss": None}, {"round": 2, "train_loss": 2.5}]
    privacy = {"unit": "advertiser", "dp_enabled": True, "clients": {}}
    run_dir = _write_run(tmp_path / "run", metrics, privacy)
    (run_dir / "config.toml").unlink()

    text = write_report(run_dir).read_text()

    assert "| final train loss | 2.5 (round 2) |" in text
    assert "| final BLEU (server evaluation) | n/a |" in text
    assert "| max ε / target ε | n/a / n/a |" in text
    assert "No round ran a server BLEU evaluation." in text
    assert "No round reported an ε." in text
    assert "No per-client privacy accounting was recorded." in text
    assert "config.toml not found" in text
    assert (run_dir / "loss.png").is_file()
    assert not (run_dir / "bleu.png").exists()


def test_report_zero_rounds(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path / "run", [], _privacy())
    text = write_report(run_dir).read_text()

    assert "metrics.jsonl contains no rounds" in text
    assert "| rounds completed | 0 |" in text
    assert "| the-eagle | 6.93 |" in text
    assert not list(run_dir.glob("*.png"))


def test_load_metrics_invalid_json_names_line(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path / "run", METRICS[:2], _privacy())
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"round": 3, "train_loss": \n')

    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 3: invalid JSON"):
        load_metrics(run_dir)
    with pytest.raises(ValueError, match=r"line 3"):
        write_report(run_dir)


def test_load_metrics_schema_errors(tmp_path: Path) -> None:
    cases = [
        ({"round": 0}, ValueError, r"line 1: 'round' is 0, expected >= 1"),
        ({"round": "1"}, TypeError, r"line 1: 'round' is '1', expected an integer"),
        ({"round": 1, "bleu": "high"}, TypeError, r"line 1: 'bleu' is 'high'"),
        ({"round": 1, "bytes_up": -5}, ValueError, r"line 1: 'bytes_up' is -5"),
        ([1, 2], TypeError, r"line 1: expected a JSON object, got list"),
    ]
    for row, error, pattern in cases:
        (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
        with pytest.raises(error, match=pattern):
            load_metrics(tmp_path)


def test_load_metrics_fills_and_sorts(tmp_path: Path) -> None:
    lines: list[dict[str, Any]] = [{"round": 2, "train_loss": 2.0}, {"round": 1, "train_loss": 3.0},
             {"round": 2, "train_loss": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")

    rows = load_metrics(tmp_path)

    assert [row["round"] for row in rows] == [1, 2]
    assert rows[1]["train_loss"] == 1.5  # the later line for round 2 wins
    assert rows[0]["bleu"] is None
    assert rows[0]["bytes_up"] is None


def test_report_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        write_report(tmp_path / "absent")
    run_dir = _write_run(tmp_path / "run", METRICS, _privacy())
    (run_dir / "privacy.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"privacy\.json not found"):
        write_report(run_dir)
