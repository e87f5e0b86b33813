"""Client vectors masked under secure aggregation, and the conversion of their sum to a mean.

Weighted FedAvg needs ``Σ w_i Δ_i / Σ w_i``, and the server learns only sums. So each
client pre-multiplies its update delta ``Δ_i`` (trained adapter minus the adapter it
received) by its weight ``w_i`` and appends ``w_i`` itself as one more coordinate
(:data:`WEIGHT_KEY`). Both travel inside the same masked vector, so the server divides two
sums of the same clients and never receives a single ``w_i Δ_i`` unmasked. With uniform
weighting every ``w_i`` is 1 and the extra coordinate counts the contributors.

Before weighting, each client checks that its delta is finite and scales it down to L2
norm at most ``clip_norm``. Every coordinate of ``w_i Δ_i`` then lies in
``[-max_weight * clip_norm, max_weight * clip_norm]`` and the weight in
``[0, max_weight]``, so :func:`clipping_range` covers every value and the fixed-point
encoding clips nothing. The modulus is sized for the number of clients
(:class:`common.secagg.fixed_point.FixedPointConfig`), so the sum never wraps around.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from common.secagg.fixed_point import Layout

# Name of the weight coordinate in the aggregation layout. A "/" keeps it apart from
# PEFT parameter names, which use dots.
WEIGHT_KEY = "secagg/weight"

# Name of the coordinate that carries a client's noised, centred bit ``1[||Δ|| <= C] - 1/2``
# for adaptive clipping under distributed advertiser-level DP (:mod:`server.central_dp`).
COUNT_KEY = "secagg/unclipped-count"

# A function a client may apply to its clipped, weighted vector before masking, e.g. to add
# its share of distributed DP noise. It receives and returns ``{name: float64 array}``.
NoiseShare = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def aggregation_layout(adapter_layout: Layout, *, with_count: bool = False) -> Layout:
    """Return the adapter layout followed by the weight and, if requested, the count coordinate."""
    for reserved in (WEIGHT_KEY, COUNT_KEY):
        if any(name == reserved for name, _ in adapter_layout):
            raise ValueError(f"the adapter has a tensor named {reserved!r}, which is reserved")
    extra = ((COUNT_KEY, (1,)),) if with_count else ()
    return (*adapter_layout, (WEIGHT_KEY, (1,)), *extra)


def clipping_range(*, clip_norm: float, max_weight: float) -> float:
    """Return the fixed-point range ``c`` that covers every clipped, weighted coordinate."""
    return max_weight * max(clip_norm, 1.0)


def clip_delta(delta: Mapping[str, np.ndarray], clip_norm: float) -> tuple[dict, float]:
    """Return ``delta`` in float64 scaled to L2 norm at most ``clip_norm``, and its norm.

    The scaling is the server's norm bounding (:func:`server.robust.aggregate`): a delta
    of norm ``n > clip_norm`` is multiplied by ``clip_norm / n``.

    Raises
    ------
    ValueError
        If a tensor contains NaN or infinity, which would spoil the whole sum.
    """
    clipped = {name: np.asarray(value, dtype=np.float64) for name, value in delta.items()}
    for name, value in clipped.items():
        if not np.all(np.isfinite(value)):
            bad = int(np.count_nonzero(~np.isfinite(value)))
            raise ValueError(
                f"update tensor {name!r} has {bad} NaN or infinite entries: a non-finite update "
                "cannot be aggregated; check local training for divergence"
            )
    norm = math.sqrt(sum(float(np.sum(np.square(value))) for value in clipped.values()))
    if norm > clip_norm:
        factor = clip_norm / norm
        for name in clipped:
            clipped[name] *= factor
    return clipped, norm


def weighted_vector(
    delta: Mapping[str, np.ndarray],
    *,
    weight: float,
    clip_norm: float,
    noise_share: NoiseShare | None = None,
) -> tuple[dict[str, np.ndarray], float]:
    """Return the vector a client masks, ``{w Δ, WEIGHT_KEY: [w]}``, and the norm of ``Δ``.

    The norm is measured before clipping. ``noise_share``, when given, is applied last, to
    the clipped and weighted vector.
    """
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight={weight!r} is invalid: expected a finite number >= 0")
    clipped, norm = clip_delta(delta, clip_norm)
    vector = {name: weight * value for name, value in clipped.items()}
    vector[WEIGHT_KEY] = np.array([weight], dtype=np.float64)
    if noise_share is not None:
        vector = noise_share(vector)
    return vector, norm


def mean_from_sum(
    update_sum: Mapping[str, np.ndarray], error_bound: float
) -> tuple[dict[str, np.ndarray], float, float]:
    """Return the weighted mean delta, the weight sum and the per-coordinate error bound.

    ``error_bound`` is the bound of the decoded sum (``AggregateResult.error_bound``), which
    applies to every coordinate, the weight sum included. With the sums ``A`` and ``S``
    decoded as ``A'`` and ``S'``, ``|A'/S' - A/S| <= e (1 + |A/S|) / S'``, which gives
    ``e (1 + max|A'/S'|) / (S' - e)`` for the returned bound.

    Raises
    ------
    ValueError
        If the weight sum is not clearly positive or a coordinate of the sum is not finite.
    """
    weight_sum = float(np.asarray(update_sum[WEIGHT_KEY]).reshape(-1)[0])
    if not math.isfinite(weight_sum) or weight_sum <= 2 * error_bound:
        raise ValueError(
            f"the weights of the contributors sum to {weight_sum:g}, not clearly above the "
            f"fixed-point error {error_bound:g}: every client sent weight 0"
        )
    mean = {}
    largest = 0.0
    for name, value in update_sum.items():
        if name == WEIGHT_KEY:
            continue
        if not np.all(np.isfinite(value)):
            raise ValueError(f"the unmasked sum of {name!r} is not finite")
        mean[name] = np.asarray(value, dtype=np.float64) / weight_sum
        largest = max(largest, float(np.max(np.abs(mean[name]), initial=0.0)))
    bound = error_bound * (1.0 + largest) / (weight_sum - error_bound)
    return mean, weight_sum, bound
