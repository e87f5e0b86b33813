"""One training round's outcome on a client, and the metrics its reply carries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client.ledger import PrivacyLedger
from client.release import Release
from common.config import ACCOUNTANTS

# Value types that a Flower MetricRecord accepts.
MetricValues: TypeAlias = dict[str, int | float | list[int] | list[float]]


@dataclass(frozen=True)
class TrainOutcome:
    """The update a client released in a round, or its decline.

    ``release`` is None when the client declined, and ``decline_reason`` then gives the reason.
    ``replayed`` marks an update re-sent from an earlier reply to the same request.
    """

    client_id: str
    rank: int
    wire_dtype: str
    ledger: PrivacyLedger | None
    release: Release | None = None
    replayed: bool = False
    decline_reason: str = ""


def privacy_metrics(ledger: PrivacyLedger, epsilon: float) -> dict[str, float | int]:
    return {
        "epsilon": epsilon,
        "delta": ledger.target_delta,
        "noise-multiplier": float(ledger.noise_multiplier or 0.0),
        "sample-rate": float(ledger.sample_rate or 0.0),
        "total-steps": ledger.steps,
        "accountant-id": ACCOUNTANTS.index(ledger.accountant),
    }


def train_metrics(outcome: TrainOutcome) -> MetricValues:
    """Metrics of a trained reply: the release's, the replay flag and the ledger's ε."""
    assert outcome.release is not None  # only trained outcomes have train metrics
    metrics: MetricValues = {
        **outcome.release.metrics,
        "replayed": int(outcome.replayed),
    }
    if outcome.ledger is not None:
        metrics.update(privacy_metrics(outcome.ledger, outcome.ledger.epsilon()))
    return metrics


def decline_content(outcome: TrainOutcome) -> RecordDict:
    """Content of a decline reply: no tensors, the ledger's ε and the reason."""
    ledger = outcome.ledger
    assert ledger is not None  # only a client with a privacy ledger declines
    metrics: MetricValues = {
        "num-examples": 0,
        "declined": 1,
        **privacy_metrics(ledger, ledger.epsilon()),
    }
    return RecordDict(
        {
            "metrics": MetricRecord(metrics),
            "client": ConfigRecord(
                {"client-id": ledger.client_id, "decline-reason": outcome.decline_reason}
            ),
        }
    )
