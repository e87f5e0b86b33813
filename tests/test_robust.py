"""Tests for server.robust: hand-computed medians, trimmed means, norm bounds and an attacker."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest

from server.robust import (
    aggregate,
    bound_norms,
    coordinate_median,
    trimmed_mean,
    weighted_mean,
)
from server.validation import update_norm


def as_updates(*rows):
    """Wrap literal arrays as single-tensor updates named "w"."""
    return [{"w": np.array(row, dtype=np.float32)} for row in rows]


# Per-coordinate values, sorted by hand in the comments of each test.
THREE = as_updates(
    [[1, 5, -2], [0, 3, 9]],
    [[4, 2, -1], [0, 7, 1]],
    [[2, 8, -6], [5, 3, 4]],
)
FOUR = [*THREE, *as_updates([[3, 1, 0], [2, 2, 2]])]
FIVE = as_updates(
    [1, 10, -3, 0.5],
    [2, 20, -1, 0.5],
    [3, 30, -2, 0.5],
    [100, 0, 5, 0.5],
    [4, 40, -4, 0.5],
)


# ---------------------------------------------------------------------------
# Rules on literal values
# ---------------------------------------------------------------------------


def test_weighted_mean_literal():
    result = weighted_mean(as_updates([2, 4], [6, 0]), [1, 3])
    np.testing.assert_array_equal(result["w"], np.array([5.0, 1.0], np.float32))
    assert result["w"].dtype == np.float32


def test_weighted_mean_rejects_bad_weights():
    with pytest.raises(ValueError, match="one weight per update"):
        weighted_mean(as_updates([1], [2]), [1.0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        weighted_mean(as_updates([1], [2]), [1.0, -1.0])
    with pytest.raises(ValueError, match="sum to 0"):
        weighted_mean(as_updates([1], [2]), [0.0, 0.0])


def test_median_odd_count():
    # Sorted columns: (1,2,4) (2,5,8) (-6,-2,-1) / (0,0,5) (3,3,7) (1,4,9).
    result = coordinate_median(THREE)
    expected = np.array([[2, 5, -2], [0, 3, 4]], np.float32)
    np.testing.assert_array_equal(result["w"], expected)
    assert result["w"].dtype == np.float32


def test_median_even_count_averages_middle():
    # Sorted: (1,2,3,4) (1,2,5,8) (-6,-2,-1,0) / (0,0,2,5) (2,3,3,7) (1,2,4,9).
    result = coordinate_median(FOUR)
    expected = np.array([[2.5, 3.5, -1.5], [1, 3, 3]], np.float32)
    np.testing.assert_array_equal(result["w"], expected)


def test_trimmed_mean_drops_one_each_end():
    # beta=0.2 of 5 trims 1 per end. Sorted: (1,2,3,4,100) (0,10,20,30,40) (-4,-3,-2,-1,5).
    result = trimmed_mean(FIVE, beta=0.2)
    np.testing.assert_array_equal(result["w"], np.array([3, 20, -2, 0.5], np.float32))


def test_trimmed_mean_half_of_odd_count_is_median():
    result = trimmed_mean(FIVE, beta=0.5)
    np.testing.assert_array_equal(result["w"], np.array([3, 20, -2, 0.5], np.float32))


def test_trimmed_mean_small_beta_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="server.robust"):
        result = trimmed_mean(FIVE, beta=0.1)
    # Nothing trimmed: plain mean (110/5, 100/5, -5/5, 0.5).
    np.testing.assert_array_equal(result["w"], np.array([22, 20, -1, 0.5], np.float32))
    assert "trims nothing" in caplog.text
    assert "at least 10 updates" in caplog.text


def test_trimmed_mean_rejects_empty_result():
    with pytest.raises(ValueError, match="nothing would remain"):
        trimmed_mean(FOUR, beta=0.5)


@pytest.mark.parametrize("beta", [-0.1, 0.6, 1.0])
def test_trimmed_mean_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="expected a fraction in"):
        trimmed_mean(FIVE, beta=beta)


def test_rules_reject_mismatched_updates():
    with pytest.raises(ValueError, match="updates is empty"):
        coordinate_median([])
    with pytest.raises(ValueError, match="different tensor names"):
        coordinate_median([{"w": np.zeros(2)}, {"v": np.zeros(2)}])
    with pytest.raises(ValueError, match=r"has shape \(3,\)"):
        coordinate_median([{"w": np.zeros(2)}, {"w": np.zeros(3)}])


# ---------------------------------------------------------------------------
# Norm bounding
# ---------------------------------------------------------------------------


def test_bound_norms_scales_to_bound():
    reference = {"a": np.array([1.0], np.float32), "b": np.array([2.0], np.float32)}
    updates = [
        {"a": np.array([4.0], np.float32), "b": np.array([6.0], np.float32)},  # delta (3, 4)
        {"a": np.array([1.3], np.float32), "b": np.array([2.4], np.float32)},  # norm 0.5
    ]
    bounded = bound_norms(updates, reference, max_norm=1.0)

    np.testing.assert_allclose(bounded[0]["a"], [1.6], rtol=1e-7)
    np.testing.assert_allclose(bounded[0]["b"], [2.8], rtol=1e-7)
    assert update_norm(bounded[0], reference) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_array_equal(bounded[1]["a"], updates[1]["a"])
    np.testing.assert_array_equal(bounded[1]["b"], updates[1]["b"])
    assert bounded[0]["a"].dtype == np.float32


def test_bound_norms_many_clients_hit_bound_exactly():
    rng = np.random.default_rng(3)
    reference = {"w": rng.normal(size=(6, 4)).astype(np.float32)}
    updates = [{"w": reference["w"] + scale * rng.normal(size=(6, 4))} for scale in (1, 10, 100)]
    for bounded in bound_norms(updates, reference, max_norm=0.5):
        assert update_norm(bounded, reference) == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, math.nan])
def test_bound_norms_rejects_bad_bound(max_norm):
    with pytest.raises(ValueError, match="max_norm="):
        bound_norms(as_updates([1.0]), {"w": np.zeros(1)}, max_norm=max_norm)


# ---------------------------------------------------------------------------
# One attacker among five clients
# ---------------------------------------------------------------------------


@pytest.fixture
def attacked_round():
    """Return (reference, updates, honest_mean): four honest clients and one boosted by 100."""
    rng = np.random.default_rng(7)
    reference = {"w": rng.normal(size=(8, 5)).astype(np.float32)}
    deltas = [1.0 + 0.01 * rng.normal(size=(8, 5)) for _ in range(5)]
    updates = [{"w": (reference["w"] + delta).astype(np.float32)} for delta in deltas]
    honest_mean = np.mean([update["w"].astype(np.float64) for update in updates[:4]], axis=0)
    updates[4] = {"w": (reference["w"] + 100 * deltas[4]).astype(np.float32)}
    return reference, updates, honest_mean


def test_mean_is_moved_by_attacker(attacked_round):
    reference, updates, honest_mean = attacked_round
    result = aggregate(updates, [1] * 5, reference, method="mean")
    # The attacker adds about (100 - 1) / 5 ≈ 19.8 to every coordinate.
    assert np.min(np.abs(result["w"] - honest_mean)) > 15


@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
def test_robust_rules_resist_attacker(attacked_round, method):
    reference, updates, honest_mean = attacked_round
    result = aggregate(updates, [1] * 5, reference, method=method, trim_fraction=0.2)
    # Honest values spread about ±0.03 around the honest mean, the attacker is 99 away.
    assert np.max(np.abs(result["w"] - honest_mean)) < 0.05


def test_norm_bound_limits_attacker_in_mean(attacked_round):
    reference, updates, honest_mean = attacked_round
    honest_norm = math.sqrt(40)  # each honest delta is about 1 in 40 coordinates
    result = aggregate(updates, [1] * 5, reference, method="mean", norm_bound=1.1 * honest_norm)
    # The bounded attacker shifts the mean by at most about 0.1 * 1 / 5 per coordinate.
    assert np.max(np.abs(result["w"] - honest_mean)) < 0.1


# ---------------------------------------------------------------------------
# aggregate()
# ---------------------------------------------------------------------------


def test_aggregate_bound_then_mean_literal():
    reference = {"w": np.zeros(2, np.float32)}
    updates = as_updates([3, 4], [0, 1])
    result = aggregate(updates, [1, 1], reference, method="mean", norm_bound=1.0)
    # (0.6, 0.8) and (0, 1) averaged.
    np.testing.assert_allclose(result["w"], [0.3, 0.9], rtol=1e-7)
    assert result["w"].dtype == np.float32


def test_aggregate_matches_single_rules():
    reference = {"w": np.full((2, 3), 0.5, np.float32)}
    np.testing.assert_allclose(
        aggregate(THREE, [1, 2, 3], reference, method="mean")["w"],
        weighted_mean(THREE, [1, 2, 3])["w"],
        rtol=1e-6,
    )
    with pytest.warns(UserWarning):
        median = aggregate(FOUR, [1, 2, 3, 4], reference, method="median")
    np.testing.assert_array_equal(median["w"], np.array([[2.5, 3.5, -1.5], [1, 3, 3]]))


def test_aggregate_warns_when_weights_ignored():
    reference = {"w": np.zeros(4, np.float32)}
    with pytest.warns(UserWarning, match="weights .* are ignored"):
        aggregate(FIVE, [10, 20, 30, 40, 50], reference, method="trimmed-mean", trim_fraction=0.2)


def test_aggregate_uniform_weights_do_not_warn():
    reference = {"w": np.zeros(4, np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = aggregate(FIVE, [7] * 5, reference, method="trimmed-mean", trim_fraction=0.2)
    np.testing.assert_array_equal(result["w"], np.array([3, 20, -2, 0.5], np.float32))


def test_aggregate_rejects_bad_arguments():
    reference = {"w": np.zeros(4, np.float32)}
    with pytest.raises(ValueError, match="method='krum' is invalid"):
        aggregate(FIVE, [1] * 5, reference, method="krum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="norm_bound=0"):
        aggregate(FIVE, [1] * 5, reference, method="mean", norm_bound=0)
    with pytest.raises(ValueError, match="reference has different tensor names"):
        aggregate(FIVE, [1] * 5, {"v": np.zeros(4)}, method="mean")


# ---------------------------------------------------------------------------
# Streaming and per-tensor evaluation against the stacked formulas
# ---------------------------------------------------------------------------


def many_updates(count: int, seed: int = 0) -> tuple[list[dict[str, np.ndarray]], dict]:
    """``count`` updates of three tensors (one 0-d) around a shared reference."""
    rng = np.random.default_rng(seed)
    reference = {
        "a": rng.standard_normal((6, 5)).astype(np.float32),
        "b": rng.standard_normal(7).astype(np.float32),
        "s": np.float32(rng.standard_normal()) * np.ones((), np.float32),
    }
    updates = []
    for index in range(count):
        scale = 0.01 * (1 + 9 * (index % 5 == 0))  # every fifth client moves further
        updates.append(
            {
                name: (value + scale * rng.standard_normal(value.shape)).astype(np.float32)
                for name, value in reference.items()
            }
        )
    return updates, reference


def stacked_deltas(updates, reference, name, norm_bound=None) -> np.ndarray:
    """Stack every update's float64 delta for ``name`` after optional norm bounding."""
    deltas = []
    for update in updates:
        delta = {
            key: update[key].astype(np.float64) - reference[key].astype(np.float64)
            for key in reference
        }
        if norm_bound is not None:
            norm = math.sqrt(sum(float(np.sum(np.square(value))) for value in delta.values()))
            if norm > norm_bound:
                delta = {key: value * (norm_bound / norm) for key, value in delta.items()}
        deltas.append(delta[name])
    return np.stack(deltas)


@pytest.mark.parametrize("norm_bound", [None, 0.05])
def test_streaming_mean_matches_stacked_mean(norm_bound):
    updates, reference = many_updates(60)
    weights = np.random.default_rng(1).uniform(1, 50, len(updates))
    normalized = weights / weights.sum()
    result = aggregate(updates, weights, reference, method="mean", norm_bound=norm_bound)
    for name in reference:
        combined = np.tensordot(normalized, stacked_deltas(updates, reference, name, norm_bound), 1)
        expected = (reference[name].astype(np.float64) + combined).astype(np.float32)
        # The sums differ only in float64 rounding, at most one float32 step after the cast.
        np.testing.assert_array_max_ulp(result[name], expected, maxulp=1)
        assert result[name].dtype == np.float32
        assert result[name].shape == reference[name].shape


def test_streaming_weighted_mean_matches_stacked():
    updates, _ = many_updates(60)
    weights = np.arange(1, 61, dtype=np.float64)
    result = weighted_mean(updates, weights)
    for name in updates[0]:
        stacked = np.stack([update[name].astype(np.float64) for update in updates])
        expected = np.tensordot(weights / weights.sum(), stacked, 1).astype(np.float32)
        np.testing.assert_array_max_ulp(result[name], expected, maxulp=1)


@pytest.mark.parametrize("norm_bound", [None, 0.05])
def test_per_tensor_robust_rules_match_stacked(norm_bound):
    updates, reference = many_updates(21)
    ones = [1.0] * len(updates)
    median = aggregate(updates, ones, reference, method="median", norm_bound=norm_bound)
    trimmed = aggregate(
        updates, ones, reference, method="trimmed-mean", trim_fraction=0.2, norm_bound=norm_bound
    )
    for name in reference:
        stacked = stacked_deltas(updates, reference, name, norm_bound)
        base = reference[name].astype(np.float64)
        expected_median = (base + np.median(stacked, axis=0)).astype(np.float32)
        middle = np.sort(stacked, axis=0)[4:17]  # floor(0.2 * 21) = 4 dropped at each end
        expected_trimmed = (base + middle.mean(axis=0)).astype(np.float32)
        np.testing.assert_array_equal(median[name], expected_median)
        np.testing.assert_array_equal(trimmed[name], expected_trimmed)


@pytest.mark.parametrize("method", ["mean", "median", "trimmed-mean"])
def test_aggregate_leaves_inputs_unchanged(method):
    updates, reference = many_updates(12)
    before = [{name: value.copy() for name, value in update.items()} for update in updates]
    reference_before = {name: value.copy() for name, value in reference.items()}
    aggregate(updates, [1.0] * 12, reference, method=method, trim_fraction=0.2, norm_bound=0.05)
    coordinate_median(updates)
    trimmed_mean(updates, beta=0.2)
    weighted_mean(updates, [1.0] * 12)
    for update, copy in zip(updates, before):
        for name in copy:
            np.testing.assert_array_equal(update[name], copy[name])
    for name, value in reference_before.items():
        np.testing.assert_array_equal(reference[name], value)
