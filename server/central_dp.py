"""Advertiser-level differential privacy on the server: DP-FedAvg with fixed or adaptive clipping.

Sources:

- DP-FedAvg: H. B. McMahan, D. Ramage, K. Talwar, L. Zhang, "Learning Differentially
  Private Recurrent Language Models", ICLR 2018. Each sampled client's update
  ``Δ_i`` (its adapter minus the adapter it was sent) is clipped to L2 norm ``C``. The
  clipped updates are summed and divided by the fixed number ``m`` of sampled clients
  (equal weights), and Gaussian noise of standard deviation ``z * C / m`` is added.
  Adding or removing one advertiser moves that mean by at most ``C / m``, so the round is
  a subsampled Gaussian mechanism with noise multiplier ``z``. The guarantee covers all
  of one advertiser's data.
- Adaptive clipping: G. Andrew, O. Thakkar, H. B. McMahan, S. Ramaswamy, "Differentially
  Private Learning with Adaptive Clipping", NeurIPS 2021. Each client contributes the bit
  ``b_i = 1[||Δ_i|| <= C_t]``. The server releases ``b = (Σ b_i + N(0, σ_b²)) / n`` over
  the ``n`` aggregated updates and sets ``C_{t+1} = C_t * exp(-η (b - γ))``, which moves
  ``C`` towards the ``γ`` quantile of the update norms. The bit sum has sensitivity 1/2
  after centring. So the two releases together cost what one Gaussian mechanism with
  multiplier ``z`` costs when the update noise uses ``z_Δ = (z^-2 - (2 σ_b)^-2)^(-1/2)``,
  which needs ``z < 2 σ_b``.

Accounting: every round that aggregates is one step of an Opacus accountant (RDP or PRV)
with noise multiplier ``z`` and sample rate ``q = sampled / available clients``. The
round loop samples a fixed number of clients without replacement, and the accountant
treats that as Poisson sampling with the same ``q``. That is an approximation: the
analysis of fixed-size sampling differs (replace-one adjacency), and Poisson is what the
accountants implement. A round that keeps the global adapter (too few valid updates)
releases no noised output and is not counted.

Flower (1.42) ships ``DifferentialPrivacyServerSideFixedClipping`` and
``...AdaptiveClipping`` strategy wrappers. They wrap a Flower ``Strategy`` and act on
``Message`` replies, but this project's round loop (:mod:`server.loop`) aggregates
validated :class:`server.aggregation.ClientUpdate` objects, in FlexLoRA's ``ΔW`` space for
mixed ranks, and steps its own server optimizers. The wrappers also divide by the number
of replies rather than the number sampled, have no accountant and keep their clipping
norm outside any checkpoint. And their adaptive update counts *clipped* updates but
applies Andrew et al.'s formula for *unclipped* ones, so ``C`` moves the wrong way. So
the wrappers are not used, but these helpers of ``flwr.supercore.differential_privacy``
are: ``get_norm`` (L2 norm over all tensors), ``compute_stdv`` (``z * C / m``) and
``compute_adaptive_noise_params`` (``z_Δ`` above).

The server adds the noise to the mean update here. :func:`noise_share_stddev` and
:func:`add_noise_share` give the per-client share (``z * C / sqrt(m)`` on each clipped
update) for a mode in which clients add the noise before secure aggregation masks it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.config import PRV_MAX_EPSILON, AdvertiserDPConfig, ConfigError, RunConfig

# NOTE: only the supercore location (Flower 1.42) is tested; older releases had these
# helpers in flwr.common.differential_privacy.
try:
    from flwr.supercore.differential_privacy import (
        compute_adaptive_noise_params,
        compute_stdv,
        get_norm,
    )
except ImportError:  # pragma: no cover
    from flwr.common.differential_privacy import (  # type: ignore[no-redef]
        compute_adaptive_noise_params,
        compute_stdv,
        get_norm,
    )

__all__ = [
    "AdvertiserDP",
    "RoundSampling",
    "adapt_clipping_norm",
    "add_noise_share",
    "calibrate_noise_multiplier",
    "clip_update",
    "gaussian_noise",
    "noise_share_stddev",
    "update_noise_multiplier",
]

logger = logging.getLogger(__name__)

# Streams of the seeded noise generator, so update noise and count noise never share draws.
_UPDATE_NOISE_STREAM = 1
_COUNT_NOISE_STREAM = 2


# ---------------------------------------------------------------------------
# The mechanism, one function per step
# ---------------------------------------------------------------------------


def clip_update(
    delta: Mapping[str, np.ndarray], *, clipping_norm: float
) -> tuple[dict[str, np.ndarray], bool]:
    """Scale ``delta`` by ``min(1, C / ||delta||_2)``; return it (float64) and ``||delta|| <= C``.

    The norm spans all tensors of the update. A zero update stays zero.
    """
    arrays = {name: np.asarray(value, np.float64) for name, value in delta.items()}
    norm = get_norm(list(arrays.values()))
    within = norm <= clipping_norm
    if not within:
        factor = clipping_norm / norm
        arrays = {name: value * factor for name, value in arrays.items()}
    return arrays, within


def gaussian_noise(
    shape: tuple[int, ...], stddev: float, *, rng: np.random.Generator | None
) -> np.ndarray:
    """Draw float64 noise ``N(0, stddev²)`` of ``shape``.

    With ``rng=None`` the uniforms come from the operating system's CSPRNG (``os.urandom``)
    and pass through Box-Muller. Four such draws are summed and halved, as Opacus (1.6)
    does in secure mode against floating-point attacks on a single Gaussian sample.
    """
    if rng is not None:
        return rng.normal(0.0, stddev, size=shape)
    size = int(np.prod(shape, dtype=np.int64))
    total = np.zeros(size, np.float64)
    for _ in range(4):
        raw = np.frombuffer(os.urandom(16 * size), dtype=np.uint64).reshape(2, size)
        # 53 random bits per uniform, shifted into the open interval (0, 1).
        u1, u2 = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
        total += np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return (total / 2.0 * stddev).reshape(shape)


def adapt_clipping_norm(
    clipping_norm: float,
    *,
    unclipped_fraction: float,
    target_quantile: float,
    learning_rate: float,
) -> float:
    """Return ``C * exp(-learning_rate * (unclipped_fraction - target_quantile))`` (Andrew et al.).

    More updates within the norm than ``target_quantile`` shrink ``C``, fewer grow it.
    """
    return clipping_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile))


def update_noise_multiplier(noise_multiplier: float, *, clipped_count_stddev: float) -> float:
    """Return ``z_Δ`` for the update noise when the bit count is noised with ``σ_b``.

    Raises ``ValueError`` unless ``noise_multiplier < 2 * clipped_count_stddev``: below that,
    the count noise alone would already spend more than the whole budget.
    """
    if noise_multiplier >= 2.0 * clipped_count_stddev:
        raise ValueError(
            f"noise_multiplier={noise_multiplier:.4g} needs clipped_count_stddev > "
            f"{noise_multiplier / 2:.4g}, but it is {clipped_count_stddev:.4g}"
        )
    _, update_multiplier = compute_adaptive_noise_params(
        noise_multiplier, 1.0, clipped_count_stddev
    )
    return float(update_multiplier)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    num_rounds: int,
    accountant: str,
) -> float:
    """Return the noise multiplier with which ``num_rounds`` rounds spend ``target_epsilon``.

    Opacus' search stops within 0.5 % of ``target_epsilon`` (at or below it).
    """
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            steps=num_rounds,
            accountant=accountant,
            epsilon_tolerance=0.005 * target_epsilon,
        )
    )


def noise_share_stddev(*, noise_multiplier: float, clipping_norm: float, num_sampled: int) -> float:
    """Standard deviation of one client's share of the noise: ``z * C / sqrt(m)``.

    The sum of ``m`` independent shares has standard deviation ``z * C``, so the mean of
    the ``m`` noised updates carries the ``z * C / m`` of the central mechanism.
    """
    return noise_multiplier * clipping_norm / math.sqrt(num_sampled)


def add_noise_share(
    clipped: Mapping[str, np.ndarray],
    *,
    noise_multiplier: float,
    clipping_norm: float,
    num_sampled: int,
    rng: np.random.Generator | None,
) -> dict[str, np.ndarray]:
    """Add one client's noise share to its clipped update (float64), for distributed DP.

    The update must already be clipped to ``clipping_norm``. ``rng=None`` draws from the
    operating system's CSPRNG (:func:`gaussian_noise`). NOTE: the round loop does not call
    this yet, because it needs secure aggregation to hide each noised update.
    """
    stddev = noise_share_stddev(
        noise_multiplier=noise_multiplier, clipping_norm=clipping_norm, num_sampled=num_sampled
    )
    return {
        name: np.asarray(value, np.float64) + gaussian_noise(np.shape(value), stddev, rng=rng)
        for name, value in clipped.items()
    }


# ---------------------------------------------------------------------------
# Server state across rounds
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundSampling:
    """How many clients a round sampled, out of how many available."""

    server_round: int
    num_sampled: int
    num_available: int

    @property
    def sample_rate(self) -> float:
        return self.num_sampled / self.num_available


@dataclass(frozen=True)
class RoundRelease:
    """Public record of one round: its clipping norm, noise and noised unclipped fraction."""

    server_round: int
    clipping_norm: float
    noise_stddev: float
    num_sampled: int
    sample_rate: float
    unclipped_fraction: float | None


def planned_sampling(cfg: RunConfig) -> tuple[int, float]:
    """Expected clients per round and sample rate for ``data.num-clients`` clients.

    Follows :func:`server.nodes.sample_nodes`: ``max(int(N * fraction_train),
    min_train_nodes)``, at most ``N``.
    """
    num_clients = cfg.data.num_clients
    sampled = max(int(num_clients * cfg.server.fraction_train), cfg.server.min_train_nodes)
    sampled = min(sampled, num_clients)
    return sampled, sampled / num_clients


class AdvertiserDP:
    """Clip, average and noise client updates, and account for them across rounds.

    Parameters
    ----------
    cfg : AdvertiserDPConfig
        The ``[advertiser-dp]`` table; ``enabled`` must be true.
    num_rounds : int
        Rounds the noise multiplier is calibrated for (``server.num-rounds``).
    planned_num_sampled : int
        Expected clients per round; sets the default ``σ_b = planned_num_sampled / 20``.
    planned_sample_rate : float
        Sample rate the noise multiplier is calibrated for.
    seed : int
        Seed of the noise generator; ignored when ``secure_mode`` is true.
    secure_mode : bool
        Draw noise from the operating system's CSPRNG instead of a seeded generator.
    """

    def __init__(
        self,
        cfg: AdvertiserDPConfig,
        *,
        num_rounds: int,
        planned_num_sampled: int,
        planned_sample_rate: float,
        seed: int,
        secure_mode: bool,
    ) -> None:
        if not cfg.enabled:
            raise ValueError("AdvertiserDP needs advertiser-dp.enabled = true")
        self.cfg = cfg
        self.num_rounds = num_rounds
        self.planned_sample_rate = planned_sample_rate
        self.seed = seed
        self.secure_mode = secure_mode
        self.accountant = cfg.accountant_in_use

        # Noise multiplier: given, or calibrated for the planned rounds and sample rate.
        if cfg.noise_multiplier > 0:
            self.noise_multiplier = cfg.noise_multiplier
        else:
            self.noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=cfg.target_epsilon,
                target_delta=cfg.target_delta,
                sample_rate=planned_sample_rate,
                num_rounds=num_rounds,
                accountant=self.accountant,
            )

        # Adaptive clipping spends part of the budget on the bit count.
        self.clipped_count_stddev = 0.0
        self.update_noise_multiplier = self.noise_multiplier
        if cfg.adaptive_clipping:
            self.clipped_count_stddev = cfg.clipped_count_stddev or planned_num_sampled / 20
            try:
                self.update_noise_multiplier = update_noise_multiplier(
                    self.noise_multiplier, clipped_count_stddev=self.clipped_count_stddev
                )
            except ValueError as err:
                raise ConfigError(
                    f"invalid advertiser-dp.clipped-count-stddev = {cfg.clipped_count_stddev!r} "
                    f"(0 means {planned_num_sampled} expected clients / 20): {err}; raise it, "
                    "lower the noise multiplier or turn adaptive-clipping off"
                ) from None

        self.clipping_norm = cfg.clipping_norm
        self.history: list[tuple[float, float, int]] = []  # (z, q, steps), Opacus' format
        self.releases: list[RoundRelease] = []
        self._epsilon_cache: dict[tuple[tuple[float, float, int], ...], float] = {}
        self._warned_sample_rate = False

        logger.info(
            "advertiser-dp: noise_multiplier=%.4g (update noise %.4g), clipping_norm=%.4g "
            "(%s), planned sample_rate=%.4g over %s rounds, accountant=%s",
            self.noise_multiplier,
            self.update_noise_multiplier,
            self.clipping_norm,
            "adaptive" if cfg.adaptive_clipping else "fixed",
            planned_sample_rate,
            num_rounds,
            self.accountant,
        )
        if self.accountant != cfg.accountant:
            logger.warning(
                "advertiser-dp: accountant = %s is inaccurate above epsilon %s and "
                "target-epsilon = %s, so rounds are composed with %s",
                cfg.accountant,
                PRV_MAX_EPSILON,
                cfg.target_epsilon,
                self.accountant,
            )
        if not secure_mode:
            logger.warning(
                "advertiser-dp: privacy.secure-mode is off: the server's noise comes from a "
                "generator seeded with the run seed, so anyone with the config can remove it"
            )

    @classmethod
    def from_run_config(cls, cfg: RunConfig) -> AdvertiserDP | None:
        """Build the state for ``cfg``, or return None when advertiser-level DP is off."""
        if not cfg.advertiser_dp.enabled:
            return None
        planned_num_sampled, planned_sample_rate = planned_sampling(cfg)
        return cls(
            cfg.advertiser_dp,
            num_rounds=cfg.server.num_rounds,
            planned_num_sampled=planned_num_sampled,
            planned_sample_rate=planned_sample_rate,
            seed=cfg.seed,
            secure_mode=cfg.privacy.secure_mode,
        )

    def _generator(self, server_round: int, stream: int) -> np.random.Generator | None:
        # One generator per round and stream, so a resumed run draws the same noise.
        if self.secure_mode:
            return None
        return np.random.default_rng([self.seed, server_round, stream])

    def privatize(
        self, deltas: Sequence[Mapping[str, np.ndarray]], sampling: RoundSampling
    ) -> dict[str, np.ndarray]:
        """Return the noised mean of the clipped ``deltas`` (float64) and advance the state.

        ``deltas`` are the valid updates of the round, each relative to the point its client
        started from. Sampled clients without a valid update (failed, declined, rejected)
        count as zero updates: the sum is divided by ``sampling.num_sampled``.
        """
        if not deltas:
            raise ValueError("deltas is empty: pass at least one valid update")
        if len(deltas) > sampling.num_sampled:
            raise ValueError(
                f"{len(deltas)} updates from {sampling.num_sampled} sampled clients: each "
                "sampled client sends at most one update"
            )
        self._check_sample_rate(sampling)
        clipping_norm = self.clipping_norm
        num_sampled = sampling.num_sampled

        # Clip every update to C and sum; the bits count updates already within C.
        total: dict[str, np.ndarray] = {}
        within_count = 0
        for delta in deltas:
            clipped, within = clip_update(delta, clipping_norm=clipping_norm)
            within_count += int(within)
            for name, value in clipped.items():
                total[name] = total[name] + value if name in total else value

        # Mean over the sampled clients plus Gaussian noise of z_Δ * C / m.
        stddev = compute_stdv(self.update_noise_multiplier, clipping_norm, num_sampled)
        rng = self._generator(sampling.server_round, _UPDATE_NOISE_STREAM)
        noised = {
            name: value / num_sampled + gaussian_noise(value.shape, stddev, rng=rng)
            for name, value in sorted(total.items())
        }

        # Adaptive clipping: noise the bit count and move C for the next round.
        unclipped_fraction = None
        if self.cfg.adaptive_clipping:
            count_rng = self._generator(sampling.server_round, _COUNT_NOISE_STREAM)
            count_noise = float(gaussian_noise((1,), self.clipped_count_stddev, rng=count_rng)[0])
            unclipped_fraction = (within_count + count_noise) / len(deltas)
            self.clipping_norm = adapt_clipping_norm(
                clipping_norm,
                unclipped_fraction=unclipped_fraction,
                target_quantile=self.cfg.target_quantile,
                learning_rate=self.cfg.clip_learning_rate,
            )

        # Account for the round and record what it released (no per-client values).
        self._append_step(sampling.sample_rate)
        self.releases.append(
            RoundRelease(
                server_round=sampling.server_round,
                clipping_norm=clipping_norm,
                noise_stddev=stddev,
                num_sampled=num_sampled,
                sample_rate=sampling.sample_rate,
                unclipped_fraction=unclipped_fraction,
            )
        )
        logger.info(
            "aggregate_train: round %s: advertiser DP clipped %s updates to norm %.4g, "
            "noise stddev %.4g on the mean of %s sampled, epsilon=%.4g at delta=%.1e",
            sampling.server_round,
            len(deltas),
            clipping_norm,
            stddev,
            num_sampled,
            self.epsilon(),
            self.cfg.target_delta,
        )
        return noised

    def _check_sample_rate(self, sampling: RoundSampling) -> None:
        if self._warned_sample_rate or sampling.sample_rate <= self.planned_sample_rate * 1.0001:
            return
        self._warned_sample_rate = True
        logger.warning(
            "advertiser-dp: round %s sampled %s of %s clients (sample rate %.4g), above the "
            "planned %.4g from data.num-clients: epsilon grows faster than planned and can "
            "pass the target",
            sampling.server_round,
            sampling.num_sampled,
            sampling.num_available,
            sampling.sample_rate,
            self.planned_sample_rate,
        )

    def _append_step(self, sample_rate: float) -> None:
        z = self.noise_multiplier
        if self.history and self.history[-1][:2] == (z, sample_rate):
            self.history[-1] = (z, sample_rate, self.history[-1][2] + 1)
        else:
            self.history.append((z, sample_rate, 1))

    def epsilon(self) -> float:
        """ε spent so far at ``target_delta``, over every round that aggregated."""
        key = tuple(self.history)
        if not key:
            return 0.0
        if key not in self._epsilon_cache:
            accountant = create_accountant(mechanism=self.accountant)
            accountant.history = list(key)
            self._epsilon_cache[key] = float(accountant.get_epsilon(delta=self.cfg.target_delta))
        return self._epsilon_cache[key]

    # -- checkpoint and report ----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state that a resumed run needs."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "history": [list(event) for event in self.history],
            "releases": [asdict(release) for release in self.releases],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the noise multiplier must be the one this run uses."""
        if not math.isclose(float(state["noise_multiplier"]), self.noise_multiplier):
            raise ValueError(
                f"checkpointed advertiser-dp noise_multiplier {state['noise_multiplier']!r} "
                f"differs from this run's {self.noise_multiplier!r}: resume with the run's "
                "own config.toml"
            )
        self.clipping_norm = float(state["clipping_norm"])
        self.history = [(float(z), float(q), int(steps)) for z, q, steps in state["history"]]
        self.releases = [RoundRelease(**release) for release in state["releases"]]

    def summary(self) -> dict[str, Any]:
        """Advertiser-level guarantee and per-round clipping, as in ``privacy.json``."""
        cfg = self.cfg
        note = None
        if self.accountant != cfg.accountant:
            note = (
                f"{cfg.accountant} was requested, but target ε {cfg.target_epsilon:g} is above "
                "its accurate range, so rdp (a looser upper bound) was used"
            )
        return {
            "unit": "advertiser",
            "enabled": True,
            "epsilon": self.epsilon(),
            "delta": cfg.target_delta,
            "target_epsilon": cfg.target_epsilon or None,
            "accountant": self.accountant,
            "accountant_note": note,
            "sampling": (
                "fixed number of clients per round without replacement, accounted as "
                "Poisson sampling at the same rate"
            ),
            "noise_multiplier": self.noise_multiplier,
            "noise_multiplier_calibrated": cfg.noise_multiplier == 0,
            "update_noise_multiplier": self.update_noise_multiplier,
            "clipping": "adaptive" if cfg.adaptive_clipping else "fixed",
            "initial_clipping_norm": cfg.clipping_norm,
            "next_clipping_norm": self.clipping_norm,
            "target_quantile": cfg.target_quantile if cfg.adaptive_clipping else None,
            "clip_learning_rate": cfg.clip_learning_rate if cfg.adaptive_clipping else None,
            "clipped_count_stddev": self.clipped_count_stddev if cfg.adaptive_clipping else None,
            "planned_sample_rate": self.planned_sample_rate,
            "num_rounds": self.num_rounds,
            "rounds_accounted": sum(steps for _, _, steps in self.history),
            "weighting": (
                "uniform (the sum of clipped updates divided by the number of sampled "
                "clients, so a client without a valid update counts as zero)"
            ),
            "secure_mode": self.secure_mode,
            "rounds": [asdict(release) for release in self.releases],
        }
