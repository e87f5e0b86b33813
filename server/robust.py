"""Robust aggregation of adapter tensors: weighted mean, coordinate-wise median and trimmed mean.

Every function takes client tensors as mappings from PEFT state-dict name to array with
identical keys and shapes (validate them first with :mod:`server.validation`). Arithmetic is
done in float64 and results are returned as float32.

Sources:

- Coordinate-wise median and trimmed mean: D. Yin, Y. Chen, K. Ramchandran, P. Bartlett,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018.
- Norm bounding: Z. Sun, P. Kairouz, A. T. Suresh, H. B. McMahan, "Can You Really Backdoor
  Federated Learning?", NeurIPS 2019 FL workshop. Each client's delta
  is scaled by ``1 / max(1, ||delta||_2 / M)``.

With LoRA, these functions act on ``lora_A`` and ``lora_B`` entry by entry, so the mean of
the factors is not the mean of the products ``B @ A``. For heterogeneous ranks, use
:mod:`server.mixed_rank`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

__all__ = [
    "AggregationMethod",
    "aggregate",
    "bound_norms",
    "coordinate_median",
    "trimmed_mean",
    "weighted_mean",
]

logger = logging.getLogger(__name__)

AggregationMethod = Literal["mean", "median", "trimmed-mean"]
_METHODS: tuple[str, ...] = ("mean", "median", "trimmed-mean")

# Guards floor(beta * n) against products such as 0.29 * 100 = 28.999999999999996.
_TRIM_ROUNDING_SLACK = 1e-9


# ---------------------------------------------------------------------------
# Input checks and conversions
# ---------------------------------------------------------------------------


def _check_updates(updates: Sequence[Mapping[str, np.ndarray]]) -> list[str]:
    """Return the sorted tensor names after checking that all updates share keys and shapes."""
    if len(updates) == 0:
        raise ValueError("updates is empty. Pass at least one client update to aggregate.")
    names = sorted(updates[0])
    shapes = {name: np.shape(updates[0][name]) for name in names}
    for index, update in enumerate(updates[1:], start=1):
        if sorted(update) != names:
            raise ValueError(
                f"updates[{index}] has different tensor names than updates[0]. "
                "Validate updates with server.validation before aggregating."
            )
        for name in names:
            if np.shape(update[name]) != shapes[name]:
                raise ValueError(
                    f"updates[{index}][{name!r}] has shape {np.shape(update[name])}, but "
                    f"updates[0] has {shapes[name]}. Validate updates before aggregating."
                )
    return names


def _check_reference(
    updates: Sequence[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray]
) -> list[str]:
    """Return the sorted tensor names after checking updates against the reference."""
    names = _check_updates(updates)
    if sorted(reference) != names:
        raise ValueError(
            "reference has different tensor names than the updates. Pass the global "
            "tensors that were sent to the clients in this round."
        )
    for name in names:
        if np.shape(reference[name]) != np.shape(updates[0][name]):
            raise ValueError(
                f"reference[{name!r}] has shape {np.shape(reference[name])}, but the updates "
                f"have {np.shape(updates[0][name])}"
            )
    return names


def _normalized_weights(weights: Sequence[float], num_updates: int) -> np.ndarray:
    """Return weights as float64 summing to 1 after checking count, sign and finiteness."""
    array = np.asarray(weights, dtype=np.float64)
    if array.shape != (num_updates,):
        raise ValueError(
            f"weights has shape {array.shape}, expected ({num_updates},): one weight per update"
        )
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(
            "weights must be finite and >= 0 (e.g. example counts). "
            "Reject clients that report invalid weights before aggregating."
        )
    total = float(array.sum())
    if total <= 0:
        raise ValueError("weights sum to 0, so no update would count. Pass positive weights.")
    return array / total


def _stack(
    updates: Sequence[Mapping[str, np.ndarray]],
    name: str,
    base: Mapping[str, np.ndarray] | None = None,
    factors: Sequence[float] | None = None,
) -> np.ndarray:
    """Stack one tensor of every update as float64, shape (num_updates, *tensor_shape).

    With ``base`` (float64), each row is the update's delta ``update - base``, scaled by
    ``factors[i]`` when given. Rows are written into one preallocated array, so the only
    other memory is one row's float64 copy.
    """
    stacked = np.empty((len(updates), *np.shape(updates[0][name])), dtype=np.float64)
    for index, update in enumerate(updates):
        row = stacked[index, ...]  # a view even for 0-d tensors
        if base is None:
            row[...] = np.asarray(update[name], dtype=np.float64)
        else:
            np.subtract(np.asarray(update[name], dtype=np.float64), base[name], out=row)
        if factors is not None and factors[index] != 1.0:
            row *= factors[index]
    return stacked


def _float64_tensors(
    tensors: Mapping[str, np.ndarray], names: Sequence[str]
) -> dict[str, np.ndarray]:
    return {name: np.asarray(tensors[name], dtype=np.float64) for name in names}


def _delta(
    update: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Return one update minus ``base`` (float64), in float64."""
    return {name: np.asarray(update[name], dtype=np.float64) - base[name] for name in names}


def _deltas(
    updates: Sequence[Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
    names: Sequence[str],
) -> list[dict[str, np.ndarray]]:
    """Return every update minus the reference, in float64."""
    base = _float64_tensors(reference, names)
    return [_delta(update, base, names) for update in updates]


def _clip_factor(delta: Mapping[str, np.ndarray], max_norm: float) -> float:
    """Return the factor 1 / max(1, ||delta||_2 / max_norm), with the norm over all tensors."""
    norm = math.sqrt(sum(float(np.sum(np.square(tensor))) for tensor in delta.values()))
    return max_norm / norm if norm > max_norm else 1.0


def _clip_deltas(deltas: list[dict[str, np.ndarray]], max_norm: float) -> None:
    """Scale each delta in place by 1 / max(1, ||delta||_2 / max_norm)."""
    for delta in deltas:
        factor = _clip_factor(delta, max_norm)
        if factor != 1.0:
            for name in delta:
                delta[name] *= factor


def _clip_factors(
    updates: Sequence[Mapping[str, np.ndarray]],
    base: Mapping[str, np.ndarray],
    names: Sequence[str],
    max_norm: float,
) -> list[float]:
    """Return the norm-bounding factor of every update's delta, one delta in memory at a time."""
    return [_clip_factor(_delta(update, base, names), max_norm) for update in updates]


def _weighted_sum(
    updates: Sequence[Mapping[str, np.ndarray]],
    normalized: np.ndarray,
    names: Sequence[str],
    base: Mapping[str, np.ndarray] | None = None,
    norm_bound: float | None = None,
) -> dict[str, np.ndarray]:
    """Sum ``normalized[i] * update_i`` in float64, one update at a time.

    With ``base`` (float64), each term is the delta ``update_i - base``, norm-bounded first
    when ``norm_bound`` is set. Only the running sum and one update's deltas are in
    memory, so time grows linearly with the number of updates and memory stays constant.
    The sum runs in update order, so it can differ from a BLAS contraction over the
    stacked updates by float64 rounding, which can move a float32 result by one unit in
    the last place.
    """
    total = {name: np.zeros(np.shape(updates[0][name]), dtype=np.float64) for name in names}
    for weight, update in zip(normalized, updates):
        if base is None:
            delta = {name: np.array(update[name], dtype=np.float64) for name in names}
        else:
            delta = _delta(update, base, names)
            if norm_bound is not None:
                _clip_deltas([delta], norm_bound)
        for name in names:
            delta[name] *= weight
            total[name] += delta[name]
    return total


def _check_max_norm(max_norm: float, argument: str) -> None:
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
        raise TypeError(f"{argument} is {type(max_norm).__name__}, expected a float")
    if not math.isfinite(max_norm) or max_norm <= 0:
        raise ValueError(f"{argument}={max_norm!r} is invalid, expected a finite value > 0")


def _trim_count(beta: float, num_updates: int) -> int:
    """Return how many values trimmed_mean drops from each end, after checking beta."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 0.5:
        raise ValueError(
            f"beta={beta!r} is invalid, expected a fraction in [0, 0.5] to trim from each end"
        )
    trimmed = math.floor(beta * num_updates + _TRIM_ROUNDING_SLACK)
    if num_updates - 2 * trimmed < 1:
        raise ValueError(
            f"beta={beta} trims {trimmed} of {num_updates} updates from each end, so nothing "
            "would remain. Lower beta or use coordinate_median."
        )
    if trimmed == 0 and beta > 0:
        logger.warning(
            "aggregate_train: trimmed mean with beta=%s over %d updates trims nothing, "
            "so the result is the unweighted mean; at least %d updates are needed to trim one "
            "from each end",
            beta,
            num_updates,
            math.ceil(1 / beta),
        )
    return trimmed


def _trimmed_mean_of_stack(stacked: np.ndarray, trimmed: int) -> np.ndarray:
    """Average axis 0 of (n, *shape) after dropping the ``trimmed`` extremes at each end.

    Sorts ``stacked`` in place, per coordinate.
    """
    stacked.sort(axis=0)
    return stacked[trimmed : stacked.shape[0] - trimmed].mean(axis=0)


# ---------------------------------------------------------------------------
# Aggregation rules
# ---------------------------------------------------------------------------


def weighted_mean(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Average updates with weights normalised to sum to 1 (FedAvg with example counts).

    Not robust: a single client can move the result arbitrarily far.
    """
    names = _check_updates(updates)
    normalized = _normalized_weights(weights, len(updates))
    total = _weighted_sum(updates, normalized, names)
    return {name: total[name].astype(np.float32) for name in names}


def coordinate_median(updates: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Take the median of every coordinate across updates (Yin et al., ICML 2018).

    Unweighted. With an even number of updates, each coordinate is the mean of its two
    middle values. The result stays bounded while fewer than half of the updates are
    arbitrary.
    """
    names = _check_updates(updates)
    return {
        name: np.median(_stack(updates, name), axis=0, overwrite_input=True).astype(np.float32)
        for name in names
    }


def trimmed_mean(
    updates: Sequence[Mapping[str, np.ndarray]], *, beta: float
) -> dict[str, np.ndarray]:
    """Average every coordinate after dropping its ``beta`` fraction of extremes at each end.

    Coordinate-wise trimmed mean of Yin et al. (ICML 2018), unweighted. For each
    coordinate, the ``floor(beta * n)`` smallest and largest of the ``n`` values are
    dropped and the rest are averaged. It tolerates up to ``floor(beta * n)`` arbitrary
    updates.

    Parameters
    ----------
    beta : float
        Fraction trimmed from each end, in [0, 0.5]. ``beta * n < 1`` trims nothing and
        logs a WARNING. ``ValueError`` is raised when no value would remain, for example
        ``beta=0.5`` with an even number of updates.
    """
    names = _check_updates(updates)
    trimmed = _trim_count(beta, len(updates))
    return {
        name: _trimmed_mean_of_stack(_stack(updates, name), trimmed).astype(np.float32)
        for name in names
    }


def bound_norms(
    updates: Sequence[Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
    *,
    max_norm: float,
) -> list[dict[str, np.ndarray]]:
    """Scale each client's delta ``update - reference`` down to L2 norm ``max_norm``.

    Norm bounding of Sun et al. (2019): ``reference + delta / max(1, ||delta||_2 / max_norm)``,
    where the norm spans all tensors of the update. Deltas with norm at most ``max_norm``
    are unchanged. This is clipping only: it adds no noise and gives no differential
    privacy guarantee by itself.
    """
    _check_max_norm(max_norm, "max_norm")
    names = _check_reference(updates, reference)
    deltas = _deltas(updates, reference, names)
    _clip_deltas(deltas, max_norm)
    return [
        {
            name: (np.asarray(reference[name], dtype=np.float64) + delta[name]).astype(np.float32)
            for name in names
        }
        for delta in deltas
    ]


def aggregate(
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    reference: Mapping[str, np.ndarray],
    *,
    method: AggregationMethod,
    trim_fraction: float = 0.1,
    norm_bound: float | None = None,
) -> dict[str, np.ndarray]:
    """Aggregate client updates with optional norm bounding followed by ``method``.

    The rule is applied to the deltas ``update - reference`` and the result is added back
    to ``reference``. The mean, median and trimmed mean all commute with this shift, so the
    result is the same as on the raw tensors, but the deltas keep precision in float64.

    Parameters
    ----------
    updates : sequence of Mapping[str, np.ndarray]
        Validated client tensors, identical keys and shapes.
    weights : sequence of float
        One weight per update, typically the example count. Only ``method="mean"`` uses
        them. Median and trimmed mean are unweighted, so non-uniform weights raise a
        ``UserWarning`` (shown once per call site under Python's default filter).
    reference : Mapping[str, np.ndarray]
        Global tensors that the clients started from in this round.
    method : {"mean", "median", "trimmed-mean"}
        ``"mean"`` is weighted FedAvg, ``"median"`` is the coordinate-wise median and
        ``"trimmed-mean"`` is the coordinate-wise trimmed mean.
    trim_fraction : float, default 0.1
        ``beta`` of :func:`trimmed_mean`. Only ``"trimmed-mean"`` uses it. With the default
        and fewer than 10 updates, nothing is trimmed (a WARNING is logged).
    norm_bound : float or None, default None
        When set, each delta is first scaled to L2 norm at most ``norm_bound``.

    Notes
    -----
    Sound combinations:

    - ``norm_bound`` with ``"mean"``: norm bounding of Sun et al. (2019). A client can
      still gain influence by reporting a large weight, so cap or verify example counts.
      With equal weights over a fixed number ``n`` of clients, adding or removing one
      client changes the result by at most ``norm_bound / n`` (replacing one: twice that),
      which is the sensitivity that advertiser-level DP noise is scaled to. With
      example-count weights, a client's share ``w_i / sum_j w_j`` depends on the reported
      counts, so the sensitivity is data-dependent.
    - ``"median"`` or ``"trimmed-mean"``, with or without ``norm_bound``: robust to a
      minority of arbitrary updates (fewer than half for the median, at most
      ``floor(trim_fraction * n)`` for the trimmed mean). Example counts are ignored.
    - ``"mean"`` without ``norm_bound``: plain FedAvg, not robust to a single bad client.
    """
    # Argument checks.
    if method not in _METHODS:
        raise ValueError(f"method={method!r} is invalid, expected one of {_METHODS}")
    if norm_bound is not None:
        _check_max_norm(norm_bound, "norm_bound")
    names = _check_reference(updates, reference)
    normalized = _normalized_weights(weights, len(updates))
    if method != "mean" and not np.allclose(normalized, normalized[0]):
        warnings.warn(
            f"method={method!r} is unweighted, so the non-uniform weights (e.g. example "
            "counts) are ignored. Use method='mean' for a weighted average.",
            UserWarning,
            stacklevel=2,
        )

    # The rule runs on the deltas (with norm bounding first), then shifts back to the
    # reference. The mean streams over the updates. The median and trimmed mean need
    # every update's value of a coordinate, so they stack one tensor at a time.
    base = _float64_tensors(reference, names)
    if method == "mean":
        combined = _weighted_sum(updates, normalized, names, base, norm_bound)
    else:
        trimmed = _trim_count(trim_fraction, len(updates)) if method == "trimmed-mean" else 0
        factors = None
        if norm_bound is not None:
            factors = _clip_factors(updates, base, names, norm_bound)
        combined = {}
        for name in names:
            stacked = _stack(updates, name, base, factors)
            if method == "median":
                combined[name] = np.median(stacked, axis=0, overwrite_input=True)
            else:
                combined[name] = _trimmed_mean_of_stack(stacked, trimmed)
            del stacked  # so that the next tensor's stack does not coexist with this one
    return {name: (base[name] + combined[name]).astype(np.float32) for name in names}
