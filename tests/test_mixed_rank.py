"""Tests for server.mixed_rank: product-space averaging over ranks 4, 8, 16 and SVD re-projection."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.mixed_rank import (
    aggregate_delta_weights,
    delta_weights,
    lora_pairs,
    project_to_client_ranks,
    project_to_rank,
    truncation_error,
)

PREFIX = "base_model.model.bert.encoder.layer.{layer}.attention.self.{module}"
MODULES = [PREFIX.format(layer=0, module="query"), PREFIX.format(layer=1, module="value")]
OUT_FEATURES, IN_FEATURES = 24, 20
LORA_ALPHA = 16


def make_adapter(rank: int, seed: int, key_format: str = "{prefix}.lora_{matrix}.weight"):
    """Return a random adapter of the given rank for MODULES, as a client would send it."""
    rng = np.random.default_rng(seed)
    adapter = {}
    for prefix in MODULES:
        adapter[key_format.format(prefix=prefix, matrix="A")] = rng.normal(
            size=(rank, IN_FEATURES)
        ).astype(np.float32)
        adapter[key_format.format(prefix=prefix, matrix="B")] = rng.normal(
            size=(OUT_FEATURES, rank)
        ).astype(np.float32)
    return adapter


def matrix_with_singular_values(singular_values, shape, seed):
    """Return U diag(σ) V^T with random orthonormal U and V."""
    rng = np.random.default_rng(seed)
    size = len(singular_values)
    left, _ = np.linalg.qr(rng.normal(size=(shape[0], size)))
    right, _ = np.linalg.qr(rng.normal(size=(shape[1], size)))
    return left @ np.diag(singular_values) @ right.T


def reconstruct(adapter, prefix, scaling):
    lora_a = adapter[f"{prefix}.lora_A.weight"].astype(np.float64)
    lora_b = adapter[f"{prefix}.lora_B.weight"].astype(np.float64)
    return scaling * lora_b @ lora_a


# ---------------------------------------------------------------------------
# Reading adapters
# ---------------------------------------------------------------------------


def test_lora_pairs_finds_modules_and_skips_others():
    adapter = make_adapter(rank=4, seed=0)
    adapter["base_model.model.classifier.weight"] = np.zeros((2, 20), np.float32)
    pairs = lora_pairs(adapter)
    assert list(pairs) == MODULES
    assert pairs[MODULES[0]] == (f"{MODULES[0]}.lora_A.weight", f"{MODULES[0]}.lora_B.weight")


def test_lora_pairs_accepts_adapter_name():
    adapter = make_adapter(rank=4, seed=0, key_format="{prefix}.lora_{matrix}.default.weight")
    pairs = lora_pairs(adapter)
    assert pairs[MODULES[1]] == (
        f"{MODULES[1]}.lora_A.default.weight",
        f"{MODULES[1]}.lora_B.default.weight",
    )


def test_lora_pairs_rejects_lone_matrix():
    adapter = make_adapter(rank=4, seed=0)
    del adapter[f"{MODULES[0]}.lora_B.weight"]
    with pytest.raises(ValueError, match="has lora_A .* but no lora_B"):
        lora_pairs(adapter)


def test_delta_weights_literal():
    adapter = {
        "m.lora_A.weight": np.array([[1.0, 2.0]], np.float32),  # (r=1, in=2)
        "m.lora_B.weight": np.array([[1.0], [3.0]], np.float32),  # (out=2, r=1)
    }
    result = delta_weights(adapter, scaling=2.0)
    np.testing.assert_array_equal(result["m"], [[2.0, 4.0], [6.0, 12.0]])


def test_delta_weights_rejects_rank_mismatch():
    adapter = {
        "m.lora_A.weight": np.zeros((2, 5), np.float32),
        "m.lora_B.weight": np.zeros((3, 4), np.float32),
    }
    with pytest.raises(ValueError, match="with the same r"):
        delta_weights(adapter, scaling=1.0)


def test_delta_weights_rejects_per_module_ranks():
    adapter = {
        "m.lora_A.weight": np.zeros((2, 5), np.float32),
        "m.lora_B.weight": np.zeros((3, 2), np.float32),
        "n.lora_A.weight": np.zeros((4, 5), np.float32),
        "n.lora_B.weight": np.zeros((3, 4), np.float32),
    }
    with pytest.raises(ValueError, match="rank_pattern"):
        delta_weights(adapter, scaling=1.0)


# ---------------------------------------------------------------------------
# Product-space averaging
# ---------------------------------------------------------------------------


def test_aggregate_literal_ranks_one_and_two():
    client_1 = {  # ΔW = 2 · [[1, 2], [0, 0]]
        "m.lora_A.weight": np.array([[1.0, 2.0]], np.float32),
        "m.lora_B.weight": np.array([[1.0], [0.0]], np.float32),
    }
    client_2 = {  # ΔW = 0.5 · [[0, 1], [1, 0]]
        "m.lora_A.weight": np.eye(2, dtype=np.float32),
        "m.lora_B.weight": np.array([[0.0, 1.0], [1.0, 0.0]], np.float32),
    }
    result = aggregate_delta_weights([client_1, client_2], scalings=[2.0, 0.5], weights=[1, 3])
    # (1 · [[2, 4], [0, 0]] + 3 · [[0, 0.5], [0.5, 0]]) / 4
    np.testing.assert_array_equal(result["m"], [[0.5, 1.375], [0.375, 0.0]])


def test_aggregate_ranks_4_8_16_equals_weighted_sum():
    ranks = [4, 8, 16]
    adapters = [make_adapter(rank, seed=rank) for rank in ranks]
    scalings = [LORA_ALPHA / rank for rank in ranks]
    weights = [120, 30, 50]

    result = aggregate_delta_weights(adapters, scalings, weights)

    assert sorted(result) == MODULES
    for prefix in MODULES:
        expected = np.zeros((OUT_FEATURES, IN_FEATURES))
        for adapter, scaling, weight in zip(adapters, scalings, weights):
            expected += weight * reconstruct(adapter, prefix, scaling)
        expected /= sum(weights)
        assert result[prefix].shape == (OUT_FEATURES, IN_FEATURES)
        np.testing.assert_allclose(result[prefix], expected, rtol=0, atol=1e-6)


def test_factor_averaging_differs_from_product_averaging():
    # Same rank, so the factors can be averaged, but mean(B) @ mean(A) != mean(B @ A).
    adapters = [make_adapter(rank=8, seed=seed) for seed in (1, 2)]
    prefix = MODULES[0]
    mean_a = np.mean([a[f"{prefix}.lora_A.weight"] for a in adapters], axis=0)
    mean_b = np.mean([a[f"{prefix}.lora_B.weight"] for a in adapters], axis=0)
    product_mean = aggregate_delta_weights(adapters, [2.0, 2.0], [1, 1])[prefix]
    assert np.max(np.abs(2.0 * mean_b @ mean_a - product_mean)) > 1.0


def test_aggregate_rejects_different_modules():
    other = make_adapter(rank=4, seed=1)
    del other[f"{MODULES[1]}.lora_A.weight"], other[f"{MODULES[1]}.lora_B.weight"]
    with pytest.raises(ValueError, match="other modules"):
        aggregate_delta_weights([make_adapter(4, 0), other], [1.0, 1.0], [1, 1])


def test_aggregate_rejects_bad_weights_and_lengths():
    adapters = [make_adapter(4, 0), make_adapter(8, 1)]
    with pytest.raises(ValueError, match="one scaling and one weight per adapter"):
        aggregate_delta_weights(adapters, [1.0], [1, 1])
    with pytest.raises(ValueError, match="sum to 0"):
        aggregate_delta_weights(adapters, [1.0, 1.0], [0, 0])
    with pytest.raises(ValueError, match="scaling=-1.0"):
        aggregate_delta_weights(adapters, [1.0, -1.0], [1, 1])


# ---------------------------------------------------------------------------
# SVD re-projection
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_projection_shapes(rank):
    delta_w = {prefix: np.ones((OUT_FEATURES, IN_FEATURES)) for prefix in MODULES}
    adapter = project_to_rank(delta_w, rank=rank, scaling=LORA_ALPHA / rank)
    for prefix in MODULES:
        assert adapter[f"{prefix}.lora_A.weight"].shape == (rank, IN_FEATURES)
        assert adapter[f"{prefix}.lora_B.weight"].shape == (OUT_FEATURES, rank)
        assert adapter[f"{prefix}.lora_A.weight"].dtype == np.float32


@pytest.mark.parametrize("rank", [3, 4, 8, 16])
def test_projection_exact_for_low_rank(rank):
    # Global ΔW of rank 3 is reproduced exactly at any rank >= 3.
    delta = matrix_with_singular_values([4.0, 2.0, 0.5], (OUT_FEATURES, IN_FEATURES), seed=5)
    scaling = LORA_ALPHA / rank
    adapter = project_to_rank({MODULES[0]: delta}, rank=rank, scaling=scaling)
    np.testing.assert_allclose(reconstruct(adapter, MODULES[0], scaling), delta, atol=1e-6)
    assert truncation_error({MODULES[0]: delta}, rank=rank) < 1e-7


def test_projection_error_is_discarded_singular_values():
    singular_values = [5.0, 4.0, 3.0, 2.0, 1.0]
    delta = matrix_with_singular_values(singular_values, (OUT_FEATURES, IN_FEATURES), seed=6)
    adapter = project_to_rank({MODULES[0]: delta}, rank=2, scaling=8.0)
    residual = delta - reconstruct(adapter, MODULES[0], 8.0)

    # Eckart–Young: Frobenius error sqrt(3² + 2² + 1²), spectral error 3.
    assert np.linalg.norm(residual, "fro") == pytest.approx(math.sqrt(14), rel=1e-6)
    assert np.linalg.norm(residual, 2) == pytest.approx(3.0, rel=1e-6)
    leading_singular = np.linalg.svd(reconstruct(adapter, MODULES[0], 8.0), compute_uv=False)[:3]
    np.testing.assert_allclose(leading_singular, [5.0, 4.0, 0.0], atol=1e-5)
    assert truncation_error({MODULES[0]: delta}, rank=2) == pytest.approx(
        math.sqrt(14 / 55), rel=1e-9
    )


def test_projection_balances_factors():
    delta = matrix_with_singular_values([9.0, 4.0], (OUT_FEATURES, IN_FEATURES), seed=8)
    adapter = project_to_rank({MODULES[0]: delta}, rank=2, scaling=4.0)
    # Each factor carries sqrt(σ / scaling): row/column norms 1.5 and 1.
    row_norms = np.linalg.norm(adapter[f"{MODULES[0]}.lora_A.weight"], axis=1)
    column_norms = np.linalg.norm(adapter[f"{MODULES[0]}.lora_B.weight"], axis=0)
    np.testing.assert_allclose(row_norms, [1.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(column_norms, [1.5, 1.0], rtol=1e-6)


def test_projection_keeps_unused_ranks_trainable():
    delta = matrix_with_singular_values([3.0, 1.0], (OUT_FEATURES, IN_FEATURES), seed=9)
    adapter = project_to_rank({MODULES[0]: delta}, rank=8, scaling=2.0)
    lora_a = adapter[f"{MODULES[0]}.lora_A.weight"].astype(np.float64)
    lora_b = adapter[f"{MODULES[0]}.lora_B.weight"]
    # Components 3..8: B columns zero, A rows orthonormal, so ΔW is unchanged but
    # gradients with respect to B are not zero.
    np.testing.assert_array_equal(lora_b[:, 2:], 0.0)
    np.testing.assert_allclose(lora_a[2:] @ lora_a[2:].T, np.eye(6), atol=1e-6)
    np.testing.assert_allclose(reconstruct(adapter, MODULES[0], 2.0), delta, atol=1e-6)


def test_projection_key_format():
    delta_w = {MODULES[0]: np.eye(OUT_FEATURES, IN_FEATURES)}
    adapter = project_to_rank(
        delta_w, rank=4, scaling=1.0, key_format="{prefix}.lora_{matrix}.default.weight"
    )
    assert sorted(adapter) == [
        f"{MODULES[0]}.lora_A.default.weight",
        f"{MODULES[0]}.lora_B.default.weight",
    ]


@pytest.mark.parametrize("rank", [0, -2, 2.5, True])
def test_projection_rejects_bad_rank(rank):
    with pytest.raises(ValueError, match="rank="):
        project_to_rank({MODULES[0]: np.eye(3)}, rank=rank, scaling=1.0)


# ---------------------------------------------------------------------------
# One round with ranks 4, 8 and 16
# ---------------------------------------------------------------------------


def test_every_client_gets_its_own_rank():
    ranks = [4, 8, 16]
    key_formats = [
        "{prefix}.lora_{matrix}.weight",
        "{prefix}.lora_{matrix}.default.weight",
        "{prefix}.lora_{matrix}.weight",
    ]
    adapters = [
        make_adapter(rank, seed=10 + rank, key_format=key_format)
        for rank, key_format in zip(ranks, key_formats)
    ]
    scalings = [LORA_ALPHA / rank for rank in ranks]
    delta_w = aggregate_delta_weights(adapters, scalings, weights=[1, 1, 1])

    replies = project_to_client_ranks(delta_w, adapters, scalings)

    assert len(replies) == 3
    for adapter, reply, rank, scaling in zip(adapters, replies, ranks, scalings):
        assert sorted(reply) == sorted(adapter)
        for key, tensor in adapter.items():
            assert reply[key].shape == tensor.shape
        for prefix, (key_a, key_b) in lora_pairs(reply).items():
            assert reply[key_a].shape == (rank, IN_FEATURES)
            assert reply[key_b].shape == (OUT_FEATURES, rank)
            # Each reply is the best rank-r approximation of the global ΔW.
            singular = np.linalg.svd(delta_w[prefix], compute_uv=False)
            received = scaling * reply[key_b].astype(np.float64) @ reply[key_a]
            assert np.linalg.norm(delta_w[prefix] - received, "fro") == pytest.approx(
                math.sqrt(np.sum(singular[rank:] ** 2)), rel=1e-4
            )
