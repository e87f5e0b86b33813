"""Run folder bookkeeping on the server: per-round metrics and the privacy summary."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.atomic import write_bytes_atomic
from common.config import ACCOUNTANTS, PII_KINDS, PRV_MAX_EPSILON, RunConfig
from server.central_dp import AdvertiserDP

logger = logging.getLogger(__name__)

# Stated in privacy.json and the report whenever secure aggregation is on.
SECURE_AGGREGATION_VALIDATION = (
    "secure aggregation on: per-client validation moved to clients. Each client rejects its "
    "own non-finite update and clips its update to the configured L2 norm before masking; "
    "the server checks only the shapes and finiteness of the unmasked aggregate, and "
    "robust aggregation (median, trimmed mean) is unavailable"
)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary file and rename it over ``path``."""
    text = json.dumps(payload, indent=2, sort_keys=True)
    write_bytes_atomic(path, text.encode("utf-8"))


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class ClientPrivacy:
    """Privacy spending of one client, as the client reported it."""

    epsilon: float = 0.0
    delta: float = 0.0
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0
    rounds_joined: list[int] = field(default_factory=list)
    declined_rounds: list[int] = field(default_factory=list)
    accountant: str | None = None
    secure_mode: bool | None = None
    pii_replaced: int | None = None


def not_protected(cfg: RunConfig | None = None) -> list[str]:
    """List what a run with ``cfg`` leaves unprotected, as sentences for the report.

    Without ``cfg`` the list contains the items that are true of every run.
    """
    items = [
        (
            "The set of clients that take part in each round, and the number of training "
            "examples each one reports, are visible to the server. So are the rounds a "
            "client declines."
        ),
        (
            "The aggregate adapter of every round is visible to all participants, since each "
            "sampled client receives it."
        ),
        (
            "Per-client metrics sent with each reply (training loss, steps, training time, "
            "ε spent and the client's DP settings) are visible to the server. The training "
            "loss is computed on private records without noise."
        ),
    ]
    if cfg is None:
        items.append(
            "Unless the run used secure aggregation, the server sees each client's individual "
            "adapter update. With record-level DP that update is noised, but it is not hidden."
        )
        return items

    privacy = cfg.privacy
    if not cfg.server.secure_aggregation:
        items.append(
            "The run used no secure aggregation, so the server sees each client's individual "
            "adapter update. With record-level DP that update is noised, but it is not hidden."
        )
    else:
        items.append(
            "Secure aggregation hides each client's update from an honest-but-curious server "
            "only. The server cannot check one update, so a malicious client can send any "
            "vector within the fixed-point range, and clients colluding with the server can "
            "learn more than the sum."
        )
    advertiser = cfg.advertiser_dp
    if advertiser.enabled and cfg.server.secure_aggregation:
        items.append(
            "Advertiser-level noise is added by the clients in shares under secure "
            "aggregation, so an honest-but-curious server sees only the noised sum. Clients "
            "colluding with the server can subtract their own shares and lower the noise, "
            "and a client that tampers with its clipping or noise is not detected."
        )
    elif advertiser.enabled:
        items.append(
            "Advertiser-level DP is applied by the server, which receives each client's "
            "update before clipping and noise: the advertiser-level guarantee covers the "
            "global adapter and what is derived from it, not the server's own view."
        )
        items.append(
            "The numbers of sampled, accepted, rejected and declined clients per round are "
            "released without noise, and a round with too few valid updates is skipped "
            "without counting against the advertiser-level budget."
        )
    if not privacy.dp and not advertiser.enabled:
        items.append(
            "Differential privacy was off: nothing bounds what the adapters reveal about any "
            "record, and the global adapter can memorise and repeat training text."
        )
    elif not privacy.dp:
        items.append(
            "Record-level DP was off: each client's update reaches the server without noise, "
            "so only the advertiser-level noise on the aggregate protects records."
        )
    else:
        items.append(
            "The (ε, δ) guarantee covers one record. A person or business that appears in k "
            "records of an advertiser is protected only at the weaker group level (about "
            "k·ε), and an advertiser's data as a whole is not protected from the server."
        )
    if (privacy.dp or advertiser.enabled) and not privacy.secure_mode:
        items.append(
            "Secure mode was off: the DP noise came from a seeded, non-cryptographic "
            "generator and is not hardened against floating-point attacks, which is fine "
            "for experiments but not for a deployment."
        )
    kinds = sorted(privacy.scrub_kind_set)
    if not kinds:
        items.append(
            "PII scrubbing was off: emails, phone numbers, card numbers and user URLs in the "
            "records reached training."
        )
    else:
        skipped = [kind for kind in PII_KINDS if kind not in kinds]
        skipped_text = f" The kinds {', '.join(skipped)} were not scrubbed." if skipped else ""
        items.append(
            f"PII scrubbing ({', '.join(kinds)}) matches patterns only: names, street "
            "addresses and PII in other formats reach training, where DP is the only "
            f"protection.{skipped_text}"
        )
    if privacy.report_pii_counts:
        items.append(
            "Each client sends the server the exact number of PII values it replaced, a "
            "statistic of its records that the DP guarantee does not cover."
        )
    if cfg.warm_start.enabled:
        items.append(
            f"The initial adapter was fine-tuned without DP on the public records of "
            f"{cfg.warm_start.file}: the model can repeat their text, and they get no "
            "protection. The server reads no advertiser record: `fedads simulate` refuses a "
            "file that shares a record with an advertiser's data, and other launches rely on "
            "the operator choosing a public file."
        )
    if cfg.server.fraction_evaluate > 0:
        items.append(
            "Client-side evaluation losses are computed on private records without noise "
            "and sent to the server."
        )
    return items


@dataclass
class RunRecorder:
    """Appends ``metrics.jsonl`` and rewrites ``privacy.json`` in the run folder."""

    run_dir: Path
    cfg: RunConfig
    clients: dict[str, ClientPrivacy] = field(default_factory=dict)
    advertiser_dp: AdvertiserDP | None = None
    warm_start: dict[str, Any] | None = None  # server.warm_start.describe() of the run

    def __post_init__(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        privacy = self.cfg.privacy
        if privacy.dp and privacy.accountant_in_use != privacy.accountant:
            logger.warning(
                "privacy: privacy.accountant = %s is inaccurate above epsilon %s and "
                "privacy.target-epsilon = %s, so clients compose epsilon with %s",
                privacy.accountant,
                PRV_MAX_EPSILON,
                privacy.target_epsilon,
                privacy.accountant_in_use,
            )

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
        elif "steps" in metrics and not int(metrics.get("declined", 0)):
            entry.steps += int(metrics["steps"])  # no ledger without DP: count the rounds' steps
        # Metric records carry numbers only, so the client sends its ledger's accountant as
        # an index into ACCOUNTANTS.
        if "accountant-id" in metrics:
            index = int(metrics["accountant-id"])
            entry.accountant = ACCOUNTANTS[index] if 0 <= index < len(ACCOUNTANTS) else None
        if "secure-mode" in metrics:
            entry.secure_mode = bool(int(metrics["secure-mode"]))
        if "pii-replaced" in metrics:
            entry.pii_replaced = int(metrics["pii-replaced"])

    def max_epsilon(self) -> float | None:
        if not self.cfg.privacy.dp or not self.clients:
            return None
        return max(entry.epsilon for entry in self.clients.values())

    def advertiser_epsilon(self) -> float | None:
        """ε spent at the advertiser level so far; None when that mode is off."""
        return None if self.advertiser_dp is None else self.advertiser_dp.epsilon()

    def append_round(self, row: dict[str, Any]) -> None:
        """Append one round's metrics as a JSON line, flushed to disk."""
        clean = {key: _finite_or_none(value) for key, value in row.items()}
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def privacy_summary(self) -> dict[str, Any]:
        """Privacy guarantee of the run and each client's spending, as in ``privacy.json``.

        The top-level keys describe record-level DP. ``accountant`` is the one new
        ledgers use, while each client's entry names the accountant of its own ledger,
        which keeps the one it was first written with. ``units`` lists every privacy unit
        the run protects, and ``advertiser`` describes advertiser-level DP (None when off).
        """
        privacy = self.cfg.privacy
        server = self.cfg.server
        accountant = privacy.accountant_in_use
        note = None
        if accountant != privacy.accountant:
            note = (
                f"{privacy.accountant} was requested, but it is inaccurate above ε ≈ "
                f"{PRV_MAX_EPSILON:g} and the target ε is {privacy.target_epsilon:g}, so "
                f"{accountant} (a looser upper bound) was used"
            )
        pii_totals = [e.pii_replaced for e in self.clients.values() if e.pii_replaced is not None]
        units = ["record"] if privacy.dp else []
        if self.advertiser_dp is not None:
            units.append("advertiser")
        return {
            "unit": "advertiser" if units == ["advertiser"] else "record",
            "units": units,
            "advertiser": None if self.advertiser_dp is None else self.advertiser_dp.summary(),
            "dp_enabled": privacy.dp,
            "accountant": accountant,
            "accountant_requested": privacy.accountant,
            "accountant_note": note,
            "target_epsilon": privacy.target_epsilon,
            "delta": privacy.target_delta,
            "clipping_norm": privacy.clipping_norm,
            "num_rounds": self.cfg.server.num_rounds,
            # Secure mode governs the noise of both units: the clients' DP-SGD noise and
            # the advertiser-level noise, whether the server or the clients add it.
            "secure_mode": (privacy.dp or self.cfg.advertiser_dp.enabled) and privacy.secure_mode,
            "production": privacy.production,
            "secure_aggregation": server.secure_aggregation,
            "secure_aggregation_settings": self._secure_aggregation_settings(),
            "warm_start": self.warm_start,
            "pii_scrubbing": {
                "enabled": bool(privacy.scrub_kind_set),
                "kinds": sorted(privacy.scrub_kind_set),
                "counts_sent_to_server": privacy.report_pii_counts,
                "replaced_total": sum(pii_totals) if pii_totals else None,
            },
            "not_protected": not_protected(self.cfg),
            # Without record-level DP a client spends no ε and has no guarantee, so its DP
            # fields are null rather than a 0 that would read as perfect privacy.
            "clients": {
                client_id: {
                    "epsilon": entry.epsilon if privacy.dp else None,
                    "delta": entry.delta if privacy.dp else None,
                    "accountant": (entry.accountant or accountant) if privacy.dp else None,
                    "noise_multiplier": entry.noise_multiplier if privacy.dp else None,
                    "sample_rate": entry.sample_rate if privacy.dp else None,
                    "steps": entry.steps,
                    "rounds_joined": entry.rounds_joined,
                    "declined_rounds": entry.declined_rounds,
                    "secure_mode": entry.secure_mode,
                }
                for client_id, entry in sorted(self.clients.items())
            },
        }

    def _secure_aggregation_settings(self) -> dict[str, Any] | None:
        """Secure aggregation parameters and the validation trade-off; None when off."""
        server = self.cfg.server
        if not server.secure_aggregation:
            return None
        return {
            "protocol": "SecAgg+" if server.secagg_num_neighbours else "SecAgg",
            "threshold_fraction": server.secagg_threshold_fraction,
            "num_neighbours": server.secagg_num_neighbours or None,
            "modulus_bits": server.secagg_modulus_bits,
            "weighting": server.weighting,
            "max_weight": server.secagg_max_weight if server.weighting == "examples" else 1,
            # Under advertiser-level DP each client clips to the round's clipping norm instead.
            "client_clip_norm": (
                None if self.cfg.advertiser_dp.enabled else server.client_clip_norm
            ),
            "update_validation": SECURE_AGGREGATION_VALIDATION,
        }

    def write_privacy(self) -> Path:
        """Rewrite ``privacy.json`` with :meth:`privacy_summary`."""
        path = self.run_dir / "privacy.json"
        write_json_atomic(path, self.privacy_summary())
        return path
