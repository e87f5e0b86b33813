"""Validation of client adapter updates before aggregation: names, shapes, dtypes, norms, sizes."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "InvalidUpdate",
    "RejectionReason",
    "UpdateLimits",
    "filter_valid_updates",
    "payload_bytes",
    "update_norm",
    "validate_update",
]

logger = logging.getLogger(__name__)

RejectionReason = Literal[
    "missing-keys",
    "unexpected-keys",
    "shape-mismatch",
    "dtype",
    "non-finite",
    "norm-bound",
    "payload-size",
    "weight",
]

# Floating-point dtype names that ``allowed_dtypes`` may list. "bfloat16" is the name of the
# NumPy dtype that the ml_dtypes package registers. Raw bfloat16 bits stored as uint16 are not
# accepted: they cannot be distinguished from integer data, and their norm would be meaningless.
# common.adapter.record_to_arrays restores the bfloat16 dtype of arrays received from Flower.
_FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")

# Key names come from the client, so log messages quote at most this many of them, each cut
# to _MAX_NAME_CHARS characters and escaped with repr() so that a name cannot forge log lines.
_MAX_NAMES_SHOWN = 5
_MAX_NAME_CHARS = 120


@dataclass(frozen=True)
class UpdateLimits:
    """Limits that every client update must satisfy before it is aggregated.

    Parameters
    ----------
    max_update_norm : float or None
        Maximum L2 norm of the whole update, i.e. of all tensors of (client tensors - global
        tensors) concatenated into one vector. ``None`` disables the norm check.
    max_payload_bytes : int or None
        Maximum tensor data size in bytes (sum of ``ndarray.nbytes``; key names and
        serialization overhead are not counted). ``None`` disables the size check.
    allowed_dtypes : tuple of str
        NumPy dtype names a tensor may have. Default ``("float32", "float16", "bfloat16")``.
        ``"bfloat16"`` matches arrays of the ml_dtypes ``bfloat16`` dtype. Raw bfloat16 bits in
        a ``uint16`` array are rejected; view them as ``ml_dtypes.bfloat16`` or cast them to
        float32 before validation.
    """

    max_update_norm: float | None = None
    max_payload_bytes: int | None = None
    allowed_dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")

    def __post_init__(self) -> None:
        if self.max_update_norm is not None:
            norm = self.max_update_norm
            if isinstance(norm, bool) or not isinstance(norm, (int, float)):
                raise TypeError(
                    f"max_update_norm is {type(norm).__name__}, expected a float or None"
                )
            if not math.isfinite(norm) or norm <= 0:
                raise ValueError(
                    f"max_update_norm={norm!r} is invalid, expected a finite value > 0. "
                    "Pass None to disable the norm check."
                )
        if self.max_payload_bytes is not None:
            size = self.max_payload_bytes
            if isinstance(size, bool) or not isinstance(size, int):
                raise TypeError(
                    f"max_payload_bytes is {type(size).__name__}, expected an int or None"
                )
            if size <= 0:
                raise ValueError(
                    f"max_payload_bytes={size} is invalid, expected a value > 0. "
                    "Pass None to disable the size check."
                )

        # Accept any sequence of names but store a tuple, so the dataclass stays hashable.
        dtypes = self.allowed_dtypes
        if isinstance(dtypes, str):
            raise TypeError(
                f"allowed_dtypes is the string {dtypes!r}, expected a tuple of dtype names, "
                f"e.g. ({dtypes!r},)"
            )
        dtypes = tuple(dtypes)
        if not dtypes:
            raise ValueError(
                "allowed_dtypes is empty, so every update would be rejected. "
                f"List at least one of {_FLOAT_DTYPE_NAMES}."
            )
        for name in dtypes:
            if name not in _FLOAT_DTYPE_NAMES:
                raise ValueError(
                    f"allowed_dtypes contains {name!r}, expected only floating-point names "
                    f"from {_FLOAT_DTYPE_NAMES}. Cast raw bfloat16 (uint16) data to float32 "
                    "or view it as ml_dtypes.bfloat16 before validation."
                )
        object.__setattr__(self, "allowed_dtypes", dtypes)


class InvalidUpdate(ValueError):
    """Error raised when a client update fails validation.

    Attributes
    ----------
    client_id : str
        Id of the client whose update was rejected.
    reason : RejectionReason
        Short machine-readable code, e.g. ``"non-finite"`` or ``"norm-bound"``.
    detail : str
        Message for the log. It names tensors and quotes shapes, dtypes, norms and sizes,
        never tensor values.
    """

    def __init__(self, client_id: str, reason: RejectionReason, detail: str) -> None:
        self.client_id = client_id
        self.reason = reason
        self.detail = detail
        super().__init__(f"invalid update from client {client_id} ({reason}): {detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduce passes only the formatted message to __init__, which breaks
        # pickling (needed when errors cross process boundaries, e.g. under Ray).
        return (type(self), (self.client_id, self.reason, self.detail))


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """Compute the L2 norm of ``update - reference`` over all tensors, in float64.

    Both mappings must have the same keys and shapes. The result is the norm of the
    concatenation of every flattened difference tensor.
    """
    if set(update) != set(reference):
        raise ValueError(
            "update and reference have different keys: "
            f"{len(set(reference) - set(update))} missing, "
            f"{len(set(update) - set(reference))} unexpected. Validate the update first."
        )
    squared_sum = 0.0
    for name in sorted(reference):
        # Cast before subtracting so float16/bfloat16 updates do not round the difference.
        client = np.asarray(update[name]).astype(np.float64)
        server = np.asarray(reference[name]).astype(np.float64)
        if client.shape != server.shape:
            raise ValueError(
                f"tensor {name!r} has shape {client.shape} in the update but {server.shape} "
                "in the reference. Validate the update first."
            )
        squared_sum += float(np.sum(np.square(client - server)))
    return math.sqrt(squared_sum)


def payload_bytes(update: Mapping[str, np.ndarray]) -> int:
    """Return the size of the tensor data in bytes (sum of ``nbytes``, names not counted)."""
    return sum(int(np.asarray(tensor).nbytes) for tensor in update.values())


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _quote_names(names: set[str]) -> str:
    """Format client-supplied key names for a log message, capped in count and length."""
    ordered = sorted(names)
    quoted = [repr(name[:_MAX_NAME_CHARS]) for name in ordered[:_MAX_NAMES_SHOWN]]
    more = len(ordered) - len(quoted)
    suffix = f" and {more} more" if more > 0 else ""
    return ", ".join(quoted) + suffix


def validate_update(
    client_id: str,
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    limits: UpdateLimits,
) -> None:
    """Raise InvalidUpdate unless ``update`` matches ``reference`` and respects ``limits``.

    Checks run in this order, and the first failure is raised: key names
    (``missing-keys``, ``unexpected-keys``), array type and dtype (``dtype``), shapes
    (``shape-mismatch``), tensor data size (``payload-size``), NaN and infinity
    (``non-finite``) and the L2 norm of ``update - reference`` (``norm-bound``). The size
    check runs before the full scans over the values.

    Parameters
    ----------
    client_id : str
        Id used in the error message.
    update : Mapping[str, np.ndarray]
        Adapter tensors returned by the client, keyed by PEFT state-dict name.
    reference : Mapping[str, np.ndarray]
        Adapter tensors that the server sent to this client in this round. With
        heterogeneous LoRA ranks, this is the client's own-rank adapter.
    limits : UpdateLimits
        Norm, size and dtype limits.

    Raises
    ------
    InvalidUpdate
        With ``reason`` set to the code of the failed check.
    """
    # Structure: the update must be a mapping with exactly the reference's keys.
    if not isinstance(update, Mapping):
        raise InvalidUpdate(
            client_id,
            "dtype",
            f"update is {type(update).__name__}, expected a mapping of tensor name to array",
        )
    missing = set(reference) - set(update)
    if missing:
        raise InvalidUpdate(
            client_id,
            "missing-keys",
            f"{len(missing)} of {len(reference)} tensors missing: {_quote_names(missing)}",
        )
    unexpected = set(update) - set(reference)
    if unexpected:
        raise InvalidUpdate(
            client_id,
            "unexpected-keys",
            f"{len(unexpected)} tensors not in the global adapter: {_quote_names(unexpected)}",
        )

    # Per-tensor metadata: array type, dtype and shape. Nothing here reads the values.
    for name in sorted(reference):
        tensor = update[name]
        if not isinstance(tensor, np.ndarray):
            raise InvalidUpdate(
                client_id,
                "dtype",
                f"tensor {name!r} is {type(tensor).__name__}, expected numpy.ndarray",
            )
        if tensor.dtype.name not in limits.allowed_dtypes:
            raise InvalidUpdate(
                client_id,
                "dtype",
                f"tensor {name!r} has dtype {tensor.dtype.name}, "
                f"expected one of {limits.allowed_dtypes}",
            )
        expected_shape = np.shape(reference[name])
        if tensor.shape != expected_shape:
            raise InvalidUpdate(
                client_id,
                "shape-mismatch",
                f"tensor {name!r} has shape {tensor.shape}, expected {expected_shape}",
            )

    # Size before the value scans, so an oversized payload costs no further work.
    if limits.max_payload_bytes is not None:
        size = payload_bytes(update)
        if size > limits.max_payload_bytes:
            raise InvalidUpdate(
                client_id,
                "payload-size",
                f"tensor data is {size} bytes, limit max_payload_bytes={limits.max_payload_bytes}",
            )

    # Values: report only how many entries are non-finite, never the entries themselves.
    for name in sorted(reference):
        values = update[name].astype(np.float64)
        non_finite = int(values.size - np.count_nonzero(np.isfinite(values)))
        if non_finite:
            raise InvalidUpdate(
                client_id,
                "non-finite",
                f"tensor {name!r} contains {non_finite} NaN or infinite entries "
                f"out of {values.size}",
            )

    if limits.max_update_norm is not None:
        norm = update_norm(update, reference)
        if norm > limits.max_update_norm:
            raise InvalidUpdate(
                client_id,
                "norm-bound",
                f"update L2 norm {norm:.6g} exceeds max_update_norm={limits.max_update_norm:g}",
            )


def _validate_weight(client_id: str, weight: object) -> None:
    """Raise InvalidUpdate unless the aggregation weight is a finite number > 0."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)):
        raise InvalidUpdate(
            client_id, "weight", f"weight is {type(weight).__name__}, expected a number"
        )
    if not math.isfinite(float(weight)) or float(weight) <= 0:
        raise InvalidUpdate(
            client_id,
            "weight",
            f"weight {float(weight)!r} is invalid, expected a finite value > 0 "
            "(e.g. the number of training examples)",
        )


def filter_valid_updates(
    updates: Sequence[tuple[str, Mapping[str, np.ndarray], float]],
    reference: Mapping[str, np.ndarray],
    limits: UpdateLimits,
) -> tuple[list[tuple[str, Mapping[str, np.ndarray], float]], list[InvalidUpdate]]:
    """Split client updates into valid ones and rejections, logging each rejection.

    Each entry is ``(client_id, tensors, weight)``. Besides :func:`validate_update`, the
    weight (typically the example count) must be a finite number > 0, otherwise the update
    is rejected with reason ``"weight"``, because one negative or infinite weight would
    corrupt a weighted mean.

    Returns
    -------
    valid : list
        The accepted entries, unchanged and in input order.
    rejected : list of InvalidUpdate
        One error per rejected entry, in input order. Each is also logged at WARNING.
    """
    valid: list[tuple[str, Mapping[str, np.ndarray], float]] = []
    rejected: list[InvalidUpdate] = []
    for client_id, tensors, weight in updates:
        try:
            _validate_weight(client_id, weight)
            validate_update(client_id, tensors, reference, limits)
        except InvalidUpdate as error:
            logger.warning(
                "aggregate_train: rejected update from client %s (%s): %s",
                error.client_id,
                error.reason,
                error.detail,
            )
            rejected.append(error)
        else:
            valid.append((client_id, tensors, weight))
    return valid, rejected
