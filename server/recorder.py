"""Run folder bookkeeping on the server: per-round metrics and the privacy summary."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import RunConfig


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary file and rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class ClientPrivacy:
    """What the server knows of one client's privacy spending (reported by the client)."""

    epsilon: float = 0.0
    delta: float = 0.0
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0
    rounds_joined: list[int] = field(default_factory=list)
    declined_rounds: list[int] = field(default_factory=list)


@dataclass
class RunRecorder:
    """Appends ``metrics.jsonl`` and rewrites ``privacy.json`` in the run folder."""

    run_dir: Path
    cfg: RunConfig
    clients: dict[str, ClientPrivacy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def update_client(self, client_id: str, server_round: int, metrics: dict[str, Any]) -> None:
        """Record one client's reply metrics (ε spent, σ, q, steps, declined or not)."""
        entry = self.clients.setdefault(client_id, ClientPrivacy())
        if int(metrics.get("declined", 0)):
            entry.declined_rounds.append(server_round)
        else:
            entry.rounds_joined.append(server_round)
        if "epsilon" in metrics:
            entry.epsilon = float(metrics["epsilon"])
            entry.delta = float(metrics["delta"])
            entry.noise_multiplier = float(metrics["noise-multiplier"])
            entry.sample_rate = float(metrics["sample-rate"])
            entry.steps = int(metrics["total-steps"])

    def max_epsilon(self) -> float | None:
        if not self.cfg.privacy.dp or not self.clients:
            return None
        return max(entry.epsilon for entry in self.clients.values())

    def append_round(self, row: dict[str, Any]) -> None:
        """Append one round's metrics as a JSON line, flushed to disk."""
        clean = {key: _finite_or_none(value) for key, value in row.items()}
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def write_privacy(self) -> Path:
        """Rewrite ``privacy.json`` with the unit, accountant and per-client spending."""
        privacy = self.cfg.privacy
        payload = {
            "unit": "record",
            "dp_enabled": privacy.dp,
            "accountant": privacy.accountant,
            "target_epsilon": privacy.target_epsilon,
            "delta": privacy.target_delta,
            "clipping_norm": privacy.clipping_norm,
            "secure_mode": privacy.secure_mode,
            "clients": {
                client_id: {
                    "epsilon": entry.epsilon,
                    "delta": entry.delta,
                    "accountant": privacy.accountant,
                    "noise_multiplier": entry.noise_multiplier,
                    "sample_rate": entry.sample_rate,
                    "steps": entry.steps,
                    "rounds_joined": entry.rounds_joined,
                    "declined_rounds": entry.declined_rounds,
                }
                for client_id, entry in sorted(self.clients.items())
            },
        }
        path = self.run_dir / "privacy.json"
        write_json_atomic(path, payload)
        return path
