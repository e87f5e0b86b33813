"""Persistent privacy ledger of one client: DP-SGD history composed over every round.

Flower creates the ClientApp afresh each round, and a ``PrivacyEngine`` made each round
would report one round's ε only. The ledger keeps the accountant history on disk: one
``(noise_multiplier, sample_rate, steps)`` entry per round, composed by an Opacus accountant
each time ε is read. Writes go to a temporary file that is fsynced and renamed over the
old one, so a crash mid-write leaves either the old or the new ledger, never a torn one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.atomic import write_bytes_atomic

logger = logging.getLogger(__name__)

LEDGER_VERSION = 1


class BudgetExceeded(RuntimeError):
    """Raised when a round would take a client past its (ε, δ) budget."""


@dataclass(frozen=True)
class PrivacyEvent:
    """One round of DP-SGD: ``steps`` steps of the subsampled Gaussian mechanism."""

    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass
class PrivacyLedger:
    """Accountant history and budget of one client, stored as JSON at ``path``."""

    path: Path
    client_id: str
    accountant: str
    target_epsilon: float
    target_delta: float
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    events: list[PrivacyEvent] = field(default_factory=list)
    rounds_joined: list[int] = field(default_factory=list)
    declined_rounds: list[int] = field(default_factory=list)
    # ε by event history: a PRV evaluation takes about 0.1-0.6 s, and a round reads ε for
    # the same history several times (budget check, reply metrics, save).
    _epsilon_cache: dict[tuple[PrivacyEvent, ...], float] = field(
        default_factory=dict, repr=False, compare=False
    )

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        client_id: str,
        accountant: str,
        target_epsilon: float,
        target_delta: float,
    ) -> PrivacyLedger:
        """Load the ledger at ``path``, or start an empty one if the file does not exist.

        An existing ledger keeps its own accountant and budget: a budget can't be reset by
        restarting the client with other settings, and a mismatch is logged.
        """
        path = Path(path)
        if not path.exists():
            return cls(path, client_id, accountant, target_epsilon, target_delta)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"privacy ledger {path} is unreadable ({err}): restore it from a backup; "
                "deleting it would forget the privacy budget already spent"
            ) from None
        version = data.get("version")
        if version != LEDGER_VERSION:
            raise ValueError(
                f"privacy ledger {path} has version {version!r}, expected {LEDGER_VERSION}: "
                "upgrade fedads or restore a ledger written by this version"
            )
        ledger = cls(
            path=path,
            client_id=str(data["client_id"]),
            accountant=str(data["accountant"]),
            target_epsilon=float(data["target_epsilon"]),
            target_delta=float(data["target_delta"]),
            noise_multiplier=data.get("noise_multiplier"),
            sample_rate=data.get("sample_rate"),
            events=[PrivacyEvent(**event) for event in data.get("events", [])],
            rounds_joined=[int(r) for r in data.get("rounds_joined", [])],
            declined_rounds=[int(r) for r in data.get("declined_rounds", [])],
        )
        if (ledger.target_epsilon, ledger.target_delta, ledger.accountant) != (
            target_epsilon,
            target_delta,
            accountant,
        ):
            logger.warning(
                "ledger %s: keeping its stored budget (epsilon=%s, delta=%s, accountant=%s) "
                "over the requested (epsilon=%s, delta=%s, accountant=%s)",
                path,
                ledger.target_epsilon,
                ledger.target_delta,
                ledger.accountant,
                target_epsilon,
                target_delta,
                accountant,
            )
        return ledger

    @property
    def steps(self) -> int:
        return sum(event.steps for event in self.events)

    def epsilon(self, extra: PrivacyEvent | None = None) -> float:
        """ε spent so far at ``target_delta`` (plus ``extra``, to look ahead one round)."""
        events = (*self.events, *([extra] if extra is not None else []))
        if not events:
            return 0.0
        if events not in self._epsilon_cache:
            accountant = create_accountant(mechanism=self.accountant)
            accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
            self._epsilon_cache[events] = float(accountant.get_epsilon(delta=self.target_delta))
        return self._epsilon_cache[events]

    def calibrate(self, *, sample_rate: float, planned_steps: int) -> float:
        """Fix the noise multiplier so that ``planned_steps`` steps spend exactly the budget.

        The first call stores σ and q; later calls return the stored σ, so every round of
        the run uses the same mechanism that the budget was planned for.
        """
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        sigma = get_noise_multiplier(
            target_epsilon=self.target_epsilon,
            target_delta=self.target_delta,
            sample_rate=sample_rate,
            steps=planned_steps,
            accountant=self.accountant,
        )
        self.noise_multiplier = float(sigma)
        self.sample_rate = float(sample_rate)
        return self.noise_multiplier

    def check_budget(self, event: PrivacyEvent) -> float:
        """Return ε after ``event``, or raise :class:`BudgetExceeded` if it would pass the target."""
        spent = self.epsilon()
        after = self.epsilon(event)
        if after > self.target_epsilon:
            raise BudgetExceeded(
                f"client {self.client_id}: this round ({event.steps} steps, "
                f"noise_multiplier={event.noise_multiplier:.4g}, "
                f"sample_rate={event.sample_rate:.4g}) would raise epsilon from {spent:.4g} "
                f"to {after:.4g}, over the target {self.target_epsilon:.4g} "
                f"(remaining budget {max(0.0, self.target_epsilon - spent):.4g}); "
                "declining to train"
            )
        return after

    def record_round(self, server_round: int, event: PrivacyEvent) -> float:
        """Append a finished round, save atomically and return ε spent."""
        self.events.append(event)
        self.rounds_joined.append(server_round)
        self.save()
        return self.epsilon()

    def record_decline(self, server_round: int) -> None:
        self.declined_rounds.append(server_round)
        self.save()

    def to_dict(self) -> dict:
        return {
            "version": LEDGER_VERSION,
            "client_id": self.client_id,
            "accountant": self.accountant,
            "target_epsilon": self.target_epsilon,
            "target_delta": self.target_delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "epsilon": self.epsilon(),
            "events": [asdict(event) for event in self.events],
            "rounds_joined": self.rounds_joined,
            "declined_rounds": self.declined_rounds,
        }

    def save(self) -> None:
        """Write the ledger atomically (temporary file, fsync, rename)."""
        payload = json.dumps(self.to_dict(), indent=2).encode("utf-8")
        write_bytes_atomic(self.path, payload)
