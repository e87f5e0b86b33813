"""A client's part of advertiser-level DP under secure aggregation (distributed DP).

With ``advertiser-dp.enabled`` and ``server.secure-aggregation`` both on, the server never
receives one update in the clear, so each client does what the central mode's server would do to it
(:mod:`server.central_dp`, "Distributed mode"):

1. clip the whole update delta to the round's clipping norm ``C``, which the server sends
   in the train config because adaptive clipping changes it;
2. send it with weight 1, so the server's mean is uniform over the sampled clients;
3. add a Gaussian noise share of standard deviation ``z_Δ C / sqrt(m_min)`` to every
   coordinate, where ``m_min = max(server.min-train-nodes, secure aggregation threshold)``
   is the fewest survivors with which the round can aggregate. With ``s >= m_min``
   survivors the sum carries ``sqrt(s / m_min)`` times the planned noise, never less;
4. with adaptive clipping, append the centred bit ``1[||Δ|| <= C] - 1/2`` as one more
   coordinate (:data:`common.secagg.update.COUNT_KEY`) with a share of ``σ_b / sqrt(m_min)``.

The client derives ``z_Δ`` and ``σ_b`` from its own run config, so the server chooses only
``C`` and the session's threshold. Every share grows with ``C``. A higher threshold makes
each share smaller, but the client then unmasks only with at least that many survivors,
so the noise on the sum never falls below ``z_Δ C``. The noise comes from the
operating system's CSPRNG when ``privacy.secure-mode`` is on, else from a generator seeded
with the run seed, round and client id (reproducible, and removable by anyone with the
config). Colluding clients who subtract their own shares lower the noise the others get:
distributed DP protects against an honest-but-curious server, not against such coalitions.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import numpy as np
from flwr.app import ConfigRecord

from common.config import RunConfig
from common.secagg.messages import SetupMessage
from common.secagg.update import COUNT_KEY, WEIGHT_KEY, clip_delta
from server.central_dp import (
    CLIPPING_NORM_CONFIG_KEY,
    NoiseShares,
    gaussian_noise,
    run_noise_parameters,
)

# Streams of the seeded generator, so update and count noise never share draws.
_UPDATE_STREAM = 1
_COUNT_STREAM = 2


def round_noise_shares(cfg: RunConfig, config: ConfigRecord, setup: SetupMessage) -> NoiseShares:
    """Return this round's noise shares, from the server's ``C`` and the session threshold.

    Raises
    ------
    ValueError
        If the train config has no valid clipping norm, or the session's fixed-point range
        cannot hold a noised coordinate (client and server configs differ).
    """
    clipping_norm = config.get(CLIPPING_NORM_CONFIG_KEY)
    if (
        isinstance(clipping_norm, bool)
        or not isinstance(clipping_norm, (int, float))
        or not (math.isfinite(clipping_norm) and clipping_norm > 0)
    ):
        raise ValueError(
            f"invalid train config {CLIPPING_NORM_CONFIG_KEY} = {clipping_norm!r}: expected a "
            "finite number > 0, which a server running advertiser-dp with secure "
            "aggregation sends every round"
        )
    shares = NoiseShares.for_round(
        run_noise_parameters(cfg),
        clipping_norm=float(clipping_norm),
        min_survivors=max(cfg.server.min_train_nodes, setup.threshold),
    )
    # The server computes the same range from the same values; the slack absorbs rounding.
    if setup.clipping_range < shares.fixed_point_range * (1 - 1e-9):
        raise ValueError(
            f"the server's fixed-point range {setup.clipping_range:g} is below "
            f"{shares.fixed_point_range:g}, which a noised coordinate at clipping norm "
            f"{clipping_norm:g} needs: client and server must run the same [advertiser-dp] "
            "and server.min-train-nodes"
        )
    return shares


def noise_generator(
    cfg: RunConfig, client_id: str, server_round: int, stream: int
) -> np.random.Generator | None:
    """Return None (CSPRNG) in secure mode, else a generator for this client, round and stream."""
    if cfg.privacy.secure_mode:
        return None
    return np.random.default_rng([cfg.seed, server_round, zlib.crc32(client_id.encode()), stream])


def noised_vector(
    delta: Mapping[str, np.ndarray],
    shares: NoiseShares,
    *,
    adaptive_clipping: bool,
    update_rng: np.random.Generator | None,
    count_rng: np.random.Generator | None,
) -> tuple[dict[str, np.ndarray], float]:
    """Return the vector this client masks and the L2 norm of ``delta`` before clipping.

    The vector contains the clipped delta plus its noise share, the weight 1 (not noised: the
    set of contributors is public) and, with ``adaptive_clipping``, the noised centred bit.
    Raises ValueError if ``delta`` is not finite (:func:`common.secagg.update.clip_delta`).
    """
    clipped, norm = clip_delta(delta, shares.clipping_norm)
    vector = {
        name: value + gaussian_noise(value.shape, shares.update_stddev, rng=update_rng)
        for name, value in sorted(clipped.items())
    }
    vector[WEIGHT_KEY] = np.array([1.0])
    if adaptive_clipping:
        bit = 1.0 if norm <= shares.clipping_norm else 0.0
        noise = gaussian_noise((1,), shares.count_stddev, rng=count_rng)
        vector[COUNT_KEY] = bit - 0.5 + noise
    return vector, norm


def distributed_vector(
    delta: Mapping[str, np.ndarray],
    cfg: RunConfig,
    shares: NoiseShares,
    *,
    client_id: str,
    server_round: int,
) -> tuple[dict[str, np.ndarray], float]:
    """Clip, weight and noise ``delta`` with this client's generators; see :func:`noised_vector`."""
    return noised_vector(
        delta,
        shares,
        adaptive_clipping=cfg.advertiser_dp.adaptive_clipping,
        update_rng=noise_generator(cfg, client_id, server_round, _UPDATE_STREAM),
        count_rng=noise_generator(cfg, client_id, server_round, _COUNT_STREAM),
    )
