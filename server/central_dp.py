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

Distributed mode (``server.secure-aggregation`` on as well): the server never receives one
update in the clear, so the clients clip and add the noise. The server sends the round's ``C`` in the train
config (adaptive clipping changes it every round). Each client clips its whole update to
``C``, sends it with weight 1 and adds its noise share ``N(0, σ_s²)`` to every coordinate
before masking (:mod:`client.distributed_dp`). The noise comes from the operating system's
CSPRNG when ``privacy.secure-mode`` is on, else from a generator seeded with the run seed,
round and client id. The server unmasks the sum, divides it by the number ``m`` of sampled
clients (dropouts count as zero updates, as in the central mode) and adds no noise.

Dropouts: ``s`` surviving clients contribute ``s`` shares, so the sum carries noise of
standard deviation ``sqrt(s) σ_s``. Shares are therefore calibrated for the fewest
survivors with which a round can aggregate, ``m_min = max(server.min-train-nodes,
secure aggregation threshold)``: ``σ_s = z_Δ C / sqrt(m_min)``. A round with fewer
survivors fails before unmasking (:mod:`server.secure_round`), and one with ``s >= m_min``
carries ``sqrt(s / m_min)`` times the planned noise ``z_Δ C`` on the sum, i.e. noise
multiplier ``z sqrt(s / m_min) >= z``. The accountant composes ``z`` for every round, an
upper bound on ε. The price is extra noise when more than ``m_min`` clients survive.

Adaptive clipping in distributed mode: each client appends its centred bit
``b_i - 1/2`` as one more masked coordinate (:data:`common.secagg.update.COUNT_KEY`),
with its own noise share ``σ_b / sqrt(m_min)``. The server learns only the noised sum and
adds back ``s / 2`` (the number of contributors is public), so ``C`` moves exactly as in
the central mode.

Trust: the guarantee against an honest-but-curious server holds because it sees only
the sum, which contains every survivor's share. A client sees the global adapter, which
carries the same noise. Clients that collude with the server, or with each other, can
subtract their own shares, so ``k`` colluders leave noise of ``sqrt((s - k) / m_min)``
times the plan: the standard caveat of distributed DP. A server that sends a larger ``C``
raises each share in proportion, so it cannot lower the noise-to-sensitivity ratio.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common import secure_rng
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
    "CLIPPING_NORM_CONFIG_KEY",
    "AdvertiserDP",
    "NoiseParameters",
    "NoiseShares",
    "RoundSampling",
    "adapt_clipping_norm",
    "add_noise_share",
    "calibrate_noise_multiplier",
    "clip_update",
    "gaussian_noise",
    "noise_parameters",
    "noise_share_stddev",
    "run_noise_parameters",
    "update_noise_multiplier",
]

logger = logging.getLogger(__name__)

# Streams of the seeded noise generator, so update noise and count noise never share draws.
_UPDATE_NOISE_STREAM = 1
_COUNT_NOISE_STREAM = 2

# Train config key with the round's clipping norm, which clients clip to in distributed mode.
CLIPPING_NORM_CONFIG_KEY = "advertiser-dp-clipping-norm"

# The fixed-point range covers a clipped value plus this many share standard deviations.
# A Gaussian share passes that with probability about 1.5e-23 per coordinate, and only
# then is it clamped, which changes the mechanism.
RANGE_STDDEVS = 10.0


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

    With ``rng=None`` the noise comes from the operating system's CSPRNG, hardened against
    floating-point attacks (:func:`common.secure_rng.gaussian`).
    """
    if rng is not None:
        return rng.normal(0.0, stddev, size=shape)
    size = int(np.prod(shape, dtype=np.int64))
    return secure_rng.gaussian(size, stddev).reshape(shape)


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
    the ``m`` noised updates carries the ``z * C / m`` of the central mechanism. The
    distributed mode passes the minimum number of survivors as ``num_sampled``.
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
    operating system's CSPRNG (:func:`gaussian_noise`). Only secure aggregation may see the
    result, because one share is far too little noise for one update.
    """
    stddev = noise_share_stddev(
        noise_multiplier=noise_multiplier, clipping_norm=clipping_norm, num_sampled=num_sampled
    )
    return {
        name: np.asarray(value, np.float64) + gaussian_noise(np.shape(value), stddev, rng=rng)
        for name, value in clipped.items()
    }


# ---------------------------------------------------------------------------
# Noise parameters, shared by the server and the clients of the distributed mode
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseParameters:
    """Noise multipliers of the mechanism, fixed for the whole run."""

    noise_multiplier: float  # z, which the accountant composes
    update_noise_multiplier: float  # z_Δ, on the update (z when clipping is fixed)
    clipped_count_stddev: float  # σ_b on the bit count; 0 when clipping is fixed


def noise_parameters(
    cfg: AdvertiserDPConfig,
    *,
    num_rounds: int,
    planned_num_sampled: int,
    planned_sample_rate: float,
) -> NoiseParameters:
    """Return ``z`` (given or calibrated), ``z_Δ`` and ``σ_b`` for the ``[advertiser-dp]`` table.

    Raises :class:`ConfigError` when adaptive clipping's ``σ_b`` is too small for ``z``.
    """
    if cfg.noise_multiplier > 0:
        noise_multiplier = cfg.noise_multiplier
    else:
        noise_multiplier = calibrate_noise_multiplier(
            target_epsilon=cfg.target_epsilon,
            target_delta=cfg.target_delta,
            sample_rate=planned_sample_rate,
            num_rounds=num_rounds,
            accountant=cfg.accountant_in_use,
        )
    if not cfg.adaptive_clipping:
        return NoiseParameters(noise_multiplier, noise_multiplier, 0.0)

    # Adaptive clipping spends part of the budget on the bit count.
    clipped_count_stddev = cfg.clipped_count_stddev or planned_num_sampled / 20
    try:
        update_multiplier = update_noise_multiplier(
            noise_multiplier, clipped_count_stddev=clipped_count_stddev
        )
    except ValueError as err:
        raise ConfigError(
            f"invalid advertiser-dp.clipped-count-stddev = {cfg.clipped_count_stddev!r} "
            f"(0 means {planned_num_sampled} expected clients / 20): {err}; raise it, "
            "lower the noise multiplier or turn adaptive-clipping off"
        ) from None
    return NoiseParameters(noise_multiplier, update_multiplier, clipped_count_stddev)


@functools.lru_cache(maxsize=8)
def run_noise_parameters(cfg: RunConfig) -> NoiseParameters:
    """Return :func:`noise_parameters` for a run, cached because calibration takes a while."""
    planned_num_sampled, planned_sample_rate = planned_sampling(cfg)
    return noise_parameters(
        cfg.advertiser_dp,
        num_rounds=cfg.server.num_rounds,
        planned_num_sampled=planned_num_sampled,
        planned_sample_rate=planned_sample_rate,
    )


@dataclass(frozen=True)
class NoiseShares:
    """One client's share of a distributed round's noise, calibrated for ``min_survivors``."""

    clipping_norm: float
    min_survivors: int
    update_stddev: float  # z_Δ C / sqrt(m_min), on every update coordinate
    count_stddev: float  # σ_b / sqrt(m_min), on the centred bit; 0 when clipping is fixed

    @classmethod
    def for_round(
        cls, parameters: NoiseParameters, *, clipping_norm: float, min_survivors: int
    ) -> NoiseShares:
        """Return the shares of a round with clipping norm ``C`` and ``m_min`` survivors."""
        if min_survivors < 1:
            raise ValueError(f"min_survivors={min_survivors!r} is invalid: expected >= 1")
        update = noise_share_stddev(
            noise_multiplier=parameters.update_noise_multiplier,
            clipping_norm=clipping_norm,
            num_sampled=min_survivors,
        )
        count = parameters.clipped_count_stddev / math.sqrt(min_survivors)
        return cls(clipping_norm, min_survivors, update, count)

    @property
    def fixed_point_range(self) -> float:
        """Secure aggregation range for one client's noised vector.

        It covers a clipped coordinate (at most ``C``) plus ``RANGE_STDDEVS`` share standard
        deviations, the centred bit (at most 1/2) plus as many count-share deviations, and
        the weight 1.
        """
        return max(
            self.clipping_norm + RANGE_STDDEVS * self.update_stddev,
            0.5 + RANGE_STDDEVS * self.count_stddev,
            1.0,
        )


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
    """Public record of one round: its clipping norm, noise and noised unclipped fraction.

    ``noise_stddev`` is the standard deviation of the noise on the mean as realised. In the
    distributed mode that is ``sqrt(num_contributors) * noise_share_stddev / num_sampled``,
    and ``min_survivors`` is the number of survivors the shares were calibrated for.
    """

    server_round: int
    clipping_norm: float
    noise_stddev: float
    num_sampled: int
    sample_rate: float
    unclipped_fraction: float | None
    noise_added_by: str = "server"
    num_contributors: int | None = None
    min_survivors: int | None = None
    noise_share_stddev: float | None = None


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
    distributed : bool
        Clients add the noise under secure aggregation (the module's "Distributed mode"):
        :meth:`release_distributed` replaces :meth:`privatize`, which then raises.
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
        distributed: bool = False,
    ) -> None:
        if not cfg.enabled:
            raise ValueError("AdvertiserDP needs advertiser-dp.enabled = true")
        self.cfg = cfg
        self.num_rounds = num_rounds
        self.planned_sample_rate = planned_sample_rate
        self.seed = seed
        self.secure_mode = secure_mode
        self.distributed = distributed
        self.accountant = cfg.accountant_in_use

        # z given or calibrated for the planned rounds and sample rate, and z_Δ and σ_b.
        self.parameters = noise_parameters(
            cfg,
            num_rounds=num_rounds,
            planned_num_sampled=planned_num_sampled,
            planned_sample_rate=planned_sample_rate,
        )
        self.noise_multiplier = self.parameters.noise_multiplier
        self.update_noise_multiplier = self.parameters.update_noise_multiplier
        self.clipped_count_stddev = self.parameters.clipped_count_stddev

        self.clipping_norm = cfg.clipping_norm
        self.history: list[tuple[float, float, int]] = []  # (z, q, steps), Opacus' format
        self.releases: list[RoundRelease] = []
        self._epsilon_cache: dict[tuple[tuple[float, float, int], ...], float] = {}
        self._warned_sample_rate = False

        logger.info(
            "advertiser-dp: noise_multiplier=%.4g (update noise %.4g), clipping_norm=%.4g "
            "(%s), planned sample_rate=%.4g over %s rounds, accountant=%s, noise added by %s",
            self.noise_multiplier,
            self.update_noise_multiplier,
            self.clipping_norm,
            "adaptive" if cfg.adaptive_clipping else "fixed",
            planned_sample_rate,
            num_rounds,
            self.accountant,
            "the clients under secure aggregation" if distributed else "the server",
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
        if not secure_mode and distributed:
            logger.warning(
                "advertiser-dp: privacy.secure-mode is off: each client's noise share comes "
                "from a generator seeded with the run seed, round and client id, so anyone "
                "with the config can remove it"
            )
        elif not secure_mode:
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
            distributed=cfg.server.secure_aggregation,
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
        if self.distributed:
            raise RuntimeError(
                "privatize() called in the distributed mode, where the clients have added "
                "the noise already: use release_distributed() on the unmasked sum"
            )
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
            self._adapt(unclipped_fraction)

        # Account for the round and record what it released (no per-client values).
        release = RoundRelease(
            server_round=sampling.server_round,
            clipping_norm=clipping_norm,
            noise_stddev=stddev,
            num_sampled=num_sampled,
            sample_rate=sampling.sample_rate,
            unclipped_fraction=unclipped_fraction,
        )
        self._record(release)
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

    def noise_shares(self, *, min_survivors: int) -> NoiseShares:
        """Return the clients' noise shares for the next round, at the current ``C``."""
        return NoiseShares.for_round(
            self.parameters, clipping_norm=self.clipping_norm, min_survivors=min_survivors
        )

    def release_distributed(
        self,
        update_sum: Mapping[str, np.ndarray],
        *,
        centred_count: float | None,
        num_contributors: int,
        sampling: RoundSampling,
        shares: NoiseShares,
    ) -> dict[str, np.ndarray]:
        """Return the mean of an unmasked, already noised sum (float64) and advance the state.

        ``update_sum`` is the sum of the ``num_contributors`` clipped and noised updates, and
        ``centred_count`` the noised sum of their centred bits ``b_i - 1/2`` (None when
        clipping is fixed). The sum is divided by ``sampling.num_sampled`` and no noise is
        added. The round is accounted with ``z``, which bounds ε from above because
        ``num_contributors >= shares.min_survivors`` (the module's "Dropouts").

        Raises
        ------
        ValueError
            If fewer than ``shares.min_survivors`` contributed, ``shares`` are not this
            round's, or the count is missing or present against the clipping mode.
        """
        if not self.distributed:
            raise RuntimeError("release_distributed() needs the distributed mode")
        if not shares.min_survivors <= num_contributors <= sampling.num_sampled:
            raise ValueError(
                f"{num_contributors} contributors, expected {shares.min_survivors} (the "
                f"minimum survivors the noise shares are calibrated for) to "
                f"{sampling.num_sampled} (the sampled clients)"
            )
        if shares.clipping_norm != self.clipping_norm:
            raise ValueError(
                f"noise shares for clipping norm {shares.clipping_norm:.6g}, but this round's "
                f"norm is {self.clipping_norm:.6g}"
            )
        if (centred_count is None) == self.cfg.adaptive_clipping:
            raise ValueError(
                "centred_count must be given exactly when advertiser-dp.adaptive-clipping is on"
            )
        self._check_sample_rate(sampling)
        num_sampled = sampling.num_sampled
        mean = {
            name: np.asarray(value, np.float64) / num_sampled
            for name, value in sorted(update_sum.items())
        }

        # The contributors are public, so adding back s / 2 is post-processing.
        unclipped_fraction = None
        if centred_count is not None:
            unclipped_fraction = (centred_count + num_contributors / 2) / num_contributors
            self._adapt(unclipped_fraction)

        stddev = math.sqrt(num_contributors) * shares.update_stddev / num_sampled
        release = RoundRelease(
            server_round=sampling.server_round,
            clipping_norm=shares.clipping_norm,
            noise_stddev=stddev,
            num_sampled=num_sampled,
            sample_rate=sampling.sample_rate,
            unclipped_fraction=unclipped_fraction,
            noise_added_by="clients",
            num_contributors=num_contributors,
            min_survivors=shares.min_survivors,
            noise_share_stddev=shares.update_stddev,
        )
        self._record(release)
        logger.info(
            "aggregate_train: round %s: advertiser DP (distributed): %s clients clipped to "
            "norm %.4g and added noise shares of stddev %.4g (calibrated for %s survivors), "
            "noise stddev %.4g on the mean of %s sampled, epsilon=%.4g at delta=%.1e",
            sampling.server_round,
            num_contributors,
            shares.clipping_norm,
            shares.update_stddev,
            shares.min_survivors,
            stddev,
            num_sampled,
            self.epsilon(),
            self.cfg.target_delta,
        )
        return mean

    def _adapt(self, unclipped_fraction: float) -> None:
        self.clipping_norm = adapt_clipping_norm(
            self.clipping_norm,
            unclipped_fraction=unclipped_fraction,
            target_quantile=self.cfg.target_quantile,
            learning_rate=self.cfg.clip_learning_rate,
        )

    def _record(self, release: RoundRelease) -> None:
        self._append_step(release.sample_rate)
        self.releases.append(release)

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
            **self._noise_summary(),
            "rounds": [asdict(release) for release in self.releases],
        }

    def _noise_summary(self) -> dict[str, Any]:
        """Who added the noise, and for the distributed mode the share calibration."""
        if not self.distributed:
            return {
                "noise_added_by": "server (central)",
                "noise_share_stddev": None,
                "count_share_stddev": None,
                "min_survivors": None,
                "noise_note": None,
            }
        last = self.releases[-1] if self.releases else None
        return {
            "noise_added_by": "clients under secure aggregation (distributed)",
            # Of the last aggregated round: the share scales with that round's C.
            "noise_share_stddev": None if last is None else last.noise_share_stddev,
            "count_share_stddev": (
                None
                if last is None or not self.cfg.adaptive_clipping
                else self.clipped_count_stddev / math.sqrt(last.min_survivors or 1)
            ),
            "min_survivors": None if last is None else last.min_survivors,
            "noise_note": (
                "each client adds a share of stddev z_update * C / sqrt(min_survivors); with "
                "s >= min_survivors survivors the noise is sqrt(s / min_survivors) times the "
                "planned one, and a round with fewer survivors fails, so epsilon is an upper "
                "bound. Clients colluding with the server can subtract their own shares"
            ),
        }
