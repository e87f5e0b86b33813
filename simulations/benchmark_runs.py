"""Benchmark row runs: ``fedads simulate`` or ``fedads audit`` in a subprocess, then scores."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.inference import evaluate_run
from simulations.audit import AUDIT_JSON
from simulations.benchmark_rows import BenchmarkRow, format_overrides
from simulations.run import HELDOUT_FILE

logger = logging.getLogger(__name__)


def run_federated(cfg: RunConfig, output: Path) -> Path:
    """Run ``fedads simulate`` on ``cfg`` in a subprocess, for a fresh Flower runtime per run."""
    run_cfg = cfg.replace(output=str(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    config_path = output.parent / f"{output.name}.toml"
    config_path.write_text(run_cfg.to_toml(), encoding="utf-8")
    command = [sys.executable, "-m", "common.cli", "simulate", "--config", str(config_path)]
    subprocess.run(command, check=True)
    return output


def run_exposure_audit(cfg: RunConfig, output: Path, *, candidates: int) -> dict[str, Any]:
    """Run ``fedads audit`` on ``cfg`` in a subprocess and return its ``audit.json``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    config_path = output.parent / f"{output.name}.toml"
    config_path.write_text(cfg.replace(output="").to_toml(), encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "common.cli",
        "audit",
        "--config",
        str(config_path),
        "--output",
        str(output),
        "--candidates",
        str(candidates),
    ]
    subprocess.run(command, check=True)
    return json.loads((output / AUDIT_JSON).read_text(encoding="utf-8"))


def run_row(row: BenchmarkRow, base: RunConfig, output: Path, *, eval_limit: int) -> dict:
    """Train ``row``'s federated run under ``output`` and score it on its held-out file.

    ``eval_limit`` caps the held-out sources scored (0: all of them).
    """
    logger.info("benchmark: %s: %s", row.name, format_overrides(row.config_diff(base)) or "base")
    run_dir = run_federated(row.config(base), output / row.key)
    scores = evaluate_run(run_dir, run_dir / HELDOUT_FILE, limit=eval_limit or None)
    logger.info(
        "benchmark: %s: BLEU %.2f ROUGE-L %.2f", row.name, scores["bleu"], scores["rouge_l"]
    )
    return {
        **scores,
        "mode": row.mode,
        "key": row.key,
        "epsilon": row.epsilon,
        "role": row.role,
        "overrides": dict(row.overrides),
        "config_diff": row.config_diff(base),
        "run_dir": str(run_dir),
    }


def audit_entries(
    row: BenchmarkRow, base: RunConfig, output: Path, *, candidates: int
) -> dict[str, dict]:
    """Run the canary audit of ``row``; return table entries for its DP run and its control."""
    audit_dir = output / row.key
    audit = run_exposure_audit(row.config(base), audit_dir, candidates=candidates)
    diff = row.config_diff(base)
    runs = {
        "dp": (f"canary exposure, DP ε={row.epsilon:g}", diff),
        "control": (
            f"canary exposure, no-DP control of the ε={row.epsilon:g} audit",
            {**diff, "privacy.dp": False},
        ),
    }
    entries = {}
    for run_name, (label, run_diff) in runs.items():
        run = audit["runs"][run_name]
        entries[label] = {
            "mode": "exposure",
            "bits": run["exposure"],
            "max_bits": audit["max_exposure"],
            "rank": run["rank"],
            "extrapolated_bits": run["extrapolated_exposure"],
            "candidates": audit["candidates"],
            "epsilon_spent": run["epsilon"],
            "target_epsilon": row.epsilon,
            "config_diff": run_diff,
            "audit_dir": str(audit_dir),
        }
    baseline = audit.get("baseline")
    if baseline:
        entries[f"canary exposure, initial adapter of the ε={row.epsilon:g} audit"] = {
            "mode": "exposure",
            "bits": baseline["exposure"],
            "max_bits": audit["max_exposure"],
            "rank": baseline["rank"],
            "extrapolated_bits": baseline["extrapolated_exposure"],
            "candidates": audit["candidates"],
            "epsilon_spent": None,
            "target_epsilon": row.epsilon,
            "config_diff": {},
            "audit_dir": str(audit_dir),
        }
    return entries
