"""Tests for server.validation: rejection of malformed, non-finite, oversized and boosted updates."""

from __future__ import annotations

import logging
import math
import pickle
import re

import numpy as np
import pytest

from server.robust import weighted_mean
from server.validation import (
    InvalidUpdate,
    UpdateLimits,
    filter_valid_updates,
    payload_bytes,
    update_norm,
    validate_update,
)

QUERY_A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
QUERY_B = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"

# Distinctive entry value: it must never show up in a log message.
SECRET_VALUE = 0.7316842


@pytest.fixture
def reference() -> dict[str, np.ndarray]:
    """Global adapter of rank 2 on an 8 -> 6 linear layer."""
    rng = np.random.default_rng(0)
    return {
        QUERY_A: rng.normal(size=(2, 8)).astype(np.float32),
        QUERY_B: np.zeros((6, 2), dtype=np.float32),
    }


def honest_update(reference: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Return the reference plus a delta of L2 norm exactly 1 spread over both tensors."""
    rng = np.random.default_rng(seed)
    deltas = {name: rng.normal(size=tensor.shape) for name, tensor in reference.items()}
    norm = math.sqrt(sum(float(np.sum(delta**2)) for delta in deltas.values()))
    return {name: (reference[name] + deltas[name] / norm).astype(np.float32) for name in reference}


DEFAULT_LIMITS = UpdateLimits()


def rejection(update, reference, limits=DEFAULT_LIMITS) -> InvalidUpdate:
    with pytest.raises(InvalidUpdate) as caught:
        validate_update("client-7", update, reference, limits)
    return caught.value


# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_update_norm": 0.0}, "max_update_norm=0.0"),
        ({"max_update_norm": -1.0}, "max_update_norm=-1.0"),
        ({"max_update_norm": math.inf}, "max_update_norm=inf"),
        ({"max_payload_bytes": 0}, "max_payload_bytes=0"),
        ({"allowed_dtypes": ()}, "allowed_dtypes is empty"),
        ({"allowed_dtypes": ("float32", "int32")}, "'int32'"),
        ({"allowed_dtypes": ("uint16",)}, "'uint16'"),
    ],
)
def test_limits_reject_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UpdateLimits(**kwargs)


def test_limits_reject_wrong_types():
    with pytest.raises(TypeError, match="max_payload_bytes is float"):
        UpdateLimits(max_payload_bytes=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="allowed_dtypes is the string"):
        UpdateLimits(allowed_dtypes="float32")  # type: ignore[arg-type]


def test_limits_store_dtypes_as_tuple():
    limits = UpdateLimits(allowed_dtypes=["float16"])  # type: ignore[arg-type]
    assert limits.allowed_dtypes == ("float16",)
    assert hash(limits) == hash(UpdateLimits(allowed_dtypes=("float16",)))


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


def test_update_norm_spans_all_tensors():
    reference = {"a": np.zeros(2, np.float32), "b": np.ones((1, 1), np.float32)}
    update = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[5.0]], np.float32)}
    assert update_norm(update, reference) == 5.0  # sqrt(3² + (5 - 1)²)


def test_update_norm_rejects_different_keys():
    with pytest.raises(ValueError, match="different keys"):
        update_norm({"a": np.zeros(1)}, {"b": np.zeros(1)})


def test_payload_bytes_sums_nbytes():
    update = {"a": np.zeros((2, 8), np.float32), "b": np.zeros((6, 2), np.float16)}
    assert payload_bytes(update) == 2 * 8 * 4 + 6 * 2 * 2


# ---------------------------------------------------------------------------
# Single-update checks
# ---------------------------------------------------------------------------


def test_honest_update_passes(reference):
    limits = UpdateLimits(max_update_norm=2.0, max_payload_bytes=1024)
    validate_update("client-1", honest_update(reference, seed=1), reference, limits)


def test_float16_update_passes(reference):
    update = {name: tensor.astype(np.float16) for name, tensor in reference.items()}
    validate_update("client-1", update, reference, UpdateLimits())


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected(reference, bad_value):
    update = honest_update(reference, seed=1)
    update[QUERY_B][3, 1] = bad_value
    error = rejection(update, reference)
    assert error.reason == "non-finite"
    assert error.client_id == "client-7"
    assert "1 NaN or infinite entries out of 12" in error.detail
    assert QUERY_B in error.detail


def test_wrong_shape_rejected(reference):
    update = honest_update(reference, seed=1)
    update[QUERY_A] = np.zeros((4, 8), np.float32)
    error = rejection(update, reference)
    assert error.reason == "shape-mismatch"
    assert "shape (4, 8), expected (2, 8)" in error.detail


def test_missing_key_rejected(reference):
    update = honest_update(reference, seed=1)
    del update[QUERY_B]
    error = rejection(update, reference)
    assert error.reason == "missing-keys"
    assert "1 of 2 tensors missing" in error.detail
    assert QUERY_B in error.detail


def test_unexpected_key_rejected(reference):
    update = honest_update(reference, seed=1)
    update["classifier.weight"] = np.zeros((2, 6), np.float32)
    error = rejection(update, reference)
    assert error.reason == "unexpected-keys"
    assert "'classifier.weight'" in error.detail


def test_unexpected_key_names_are_capped(reference):
    update = honest_update(reference, seed=1)
    for index in range(8):
        update[f"extra.{index}\nforged log line"] = np.zeros(1, np.float32)
    error = rejection(update, reference)
    assert "and 3 more" in error.detail
    assert "\n" not in error.detail  # repr() escapes the newline


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, np.float64])
def test_disallowed_dtype_rejected(reference, dtype):
    update = {name: tensor.astype(dtype) for name, tensor in reference.items()}
    error = rejection(update, reference)
    assert error.reason == "dtype"
    assert f"dtype {np.dtype(dtype).name}" in error.detail


def test_non_array_tensor_rejected(reference):
    update = honest_update(reference, seed=1)
    update[QUERY_A] = update[QUERY_A].tolist()
    error = rejection(update, reference)
    assert error.reason == "dtype"
    assert "is list, expected numpy.ndarray" in error.detail


def test_boosted_update_rejected_by_norm(reference):
    limits = UpdateLimits(max_update_norm=5.0)
    for seed in range(3):
        validate_update(f"honest-{seed}", honest_update(reference, seed), reference, limits)

    honest = honest_update(reference, seed=3)
    boosted = {name: reference[name] + 100 * (honest[name] - reference[name]) for name in honest}
    error = rejection(boosted, reference, limits)
    assert error.reason == "norm-bound"
    match = re.fullmatch(r"update L2 norm (\S+) exceeds max_update_norm=5", error.detail)
    assert match is not None, error.detail
    assert float(match[1]) == pytest.approx(100.0, rel=1e-4)


def test_payload_over_limit_rejected(reference):
    update = honest_update(reference, seed=1)
    size = 2 * 8 * 4 + 6 * 2 * 4
    validate_update("client-1", update, reference, UpdateLimits(max_payload_bytes=size))
    error = rejection(update, reference, UpdateLimits(max_payload_bytes=size - 1))
    assert error.reason == "payload-size"
    assert f"{size} bytes, limit max_payload_bytes={size - 1}" in error.detail


def test_invalid_update_survives_pickle():
    error = InvalidUpdate("client-3", "dtype", "tensor 'x' has dtype int32")
    restored = pickle.loads(pickle.dumps(error))
    assert restored.client_id == "client-3"
    assert restored.reason == "dtype"
    assert str(restored) == str(error)


# ---------------------------------------------------------------------------
# Filtering a round of replies
# ---------------------------------------------------------------------------


def test_filter_keeps_honest_and_aggregate_unchanged(reference):
    honest = [(f"honest-{seed}", honest_update(reference, seed), 10.0 + seed) for seed in range(4)]

    nan_update = honest_update(reference, seed=10)
    nan_update[QUERY_A][0, 0] = np.nan
    boosted_source = honest_update(reference, seed=11)
    boosted = {
        name: reference[name] + 100 * (boosted_source[name] - reference[name]) for name in reference
    }
    reshaped = honest_update(reference, seed=12)
    reshaped[QUERY_B] = np.zeros((6, 4), np.float32)
    bad = [
        ("nan", nan_update, 50.0),
        ("boosted", boosted, 1000.0),
        ("reshaped", reshaped, 5.0),
        ("negative-weight", honest_update(reference, seed=13), -3.0),
    ]

    replies = [honest[0], bad[0], honest[1], bad[1], bad[2], honest[2], bad[3], honest[3]]
    valid, rejected = filter_valid_updates(replies, reference, UpdateLimits(max_update_norm=5.0))

    assert [client_id for client_id, _, _ in valid] == [f"honest-{seed}" for seed in range(4)]
    assert [(error.client_id, error.reason) for error in rejected] == [
        ("nan", "non-finite"),
        ("boosted", "norm-bound"),
        ("reshaped", "shape-mismatch"),
        ("negative-weight", "weight"),
    ]

    filtered_mean = weighted_mean([t for _, t, _ in valid], [w for _, _, w in valid])
    honest_mean = weighted_mean([t for _, t, _ in honest], [w for _, _, w in honest])
    for name in reference:
        np.testing.assert_array_equal(filtered_mean[name], honest_mean[name])


def test_filter_logs_without_tensor_values(reference, caplog):
    nan_update = {name: np.full_like(t, SECRET_VALUE) for name, t in reference.items()}
    nan_update[QUERY_A][1, 2] = np.nan
    boosted = {name: reference[name] + SECRET_VALUE * 1000 for name in reference}
    replies = [("client-a", nan_update, 1.0), ("client-b", boosted, 1.0)]

    with caplog.at_level(logging.WARNING, logger="server.validation"):
        valid, rejected = filter_valid_updates(
            replies, reference, UpdateLimits(max_update_norm=5.0)
        )

    assert valid == []
    assert len(rejected) == 2
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith(
        "aggregate_train: rejected update from client client-a (non-finite): "
    )
    assert QUERY_A in messages[0]
    assert messages[1].startswith(
        "aggregate_train: rejected update from client client-b (norm-bound): "
    )
    for record in caplog.records:
        assert record.levelno == logging.WARNING
    for message in messages:
        assert "0.7316" not in message
        assert "731.68" not in message
        assert "nan" not in message.lower().replace("nan or infinite", "")
