"""Fixed-point encoding of float updates into integers mod 2^k for secure aggregation.

Secure aggregation adds masked vectors in the ring of integers mod ``2**modulus_bits``, so
each float coordinate is first mapped to an integer. The scheme here is deterministic
rounding onto a uniform grid over the clipping range:

    x_c = clip(x, -c, c)
    q   = rint((x_c + c) / step),  step = 2c / (2**b - 1),  q in [0, 2**b - 1]

where ``c`` is ``clipping_range`` and ``b`` is ``quantization_bits``. The sum of the
encodings of ``n`` clients is at most ``n * (2**b - 1)``, so choosing ``b`` with
``n * (2**b - 1) <= 2**k - 1`` guarantees that the sum never wraps around the modulus and
``Σq`` is recovered exactly from the sum mod ``2**k``. Decoding then computes

    Σx ≈ step * Σq - n * c

Error bound per coordinate: ``|x_c - (step * q - c)| <= step / 2`` for each client, because
``q`` is the nearest grid point. Errors add over clients, so

    |decoded sum - Σ x_c| <= n * step / 2

plus float64 rounding in encode and decode, below ``n * c * 2**-48`` (each float64
operation has a relative error of at most ``2**-53`` on values of magnitude at most
``2 * n * c``). ``FixedPointConfig.error_bound`` returns both terms. The bound is against
the *clipped* values ``x_c``: values outside ``[-c, c]`` additionally lose their excess,
and ``encode`` returns how many there were.

The default modulus is ``2**32``: masks and masked vectors are then ``uint32`` arrays
(4 bytes per coordinate on the wire), and with up to 16 clients ``b = 28`` gives a step of
about ``7.5e-9 * c``. A modulus of up to ``2**64`` (``uint64``) is available for larger
cohorts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

MIN_MODULUS_BITS = 8
MAX_MODULUS_BITS = 64
# Grid indices are computed in float64, which represents integers exactly only below 2**53.
# 48 bits keeps the spacing of float64 values near 2**b well below one grid step.
MAX_QUANTIZATION_BITS = 48


def max_quantization_bits(modulus_bits: int, max_clients: int) -> int:
    """Return the largest ``b`` with ``max_clients * (2**b - 1) <= 2**modulus_bits - 1``.

    The result is capped at ``MAX_QUANTIZATION_BITS``.
    """
    # n * (2**b - 1) <= 2**k - 1  <=>  2**b <= (2**k - 1) // n + 1 (integers, exact).
    limit = (2**modulus_bits - 1) // max_clients + 1
    return min(limit.bit_length() - 1, MAX_QUANTIZATION_BITS)


@dataclass(frozen=True)
class FixedPointConfig:
    """Parameters of the fixed-point encoding, shared by the server and every client.

    Parameters
    ----------
    clipping_range : float
        ``c``: each coordinate is clipped to ``[-c, c]`` before encoding. Must be positive
        and finite.
    max_clients : int
        Maximum number of clients whose encodings are summed. Together with
        ``modulus_bits`` it bounds ``quantization_bits`` so that the sum cannot overflow.
    modulus_bits : int, default 32
        ``k``: arithmetic is mod ``2**k``, ``8 <= k <= 64``. Vectors are ``uint32`` for
        ``k <= 32`` and ``uint64`` above.
    quantization_bits : int or None, default None
        ``b``: number of grid points is ``2**b``. ``None`` picks the largest ``b`` that
        cannot overflow with ``max_clients`` clients (capped at 48). An explicit value must
        not exceed that maximum.
    """

    clipping_range: float
    max_clients: int
    modulus_bits: int = 32
    quantization_bits: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clipping_range) and self.clipping_range > 0):
            raise ValueError(
                f"clipping_range={self.clipping_range!r} is invalid: expected a positive, "
                "finite float such as the largest absolute update value you expect"
            )
        if not MIN_MODULUS_BITS <= self.modulus_bits <= MAX_MODULUS_BITS:
            raise ValueError(
                f"modulus_bits={self.modulus_bits!r} is out of range: expected an integer "
                f"from {MIN_MODULUS_BITS} to {MAX_MODULUS_BITS} (32 is the usual choice)"
            )
        if self.max_clients < 1:
            raise ValueError(
                f"max_clients={self.max_clients!r} is invalid: expected the number of "
                "clients in the round (at least 1)"
            )
        limit = max_quantization_bits(self.modulus_bits, self.max_clients)
        if limit < 1:
            raise ValueError(
                f"max_clients={self.max_clients} clients cannot be summed mod "
                f"2**{self.modulus_bits} without overflow. Increase modulus_bits"
            )
        bits = limit if self.quantization_bits is None else self.quantization_bits
        if not 1 <= bits <= limit:
            raise ValueError(
                f"quantization_bits={self.quantization_bits!r} is too large: the sum of "
                f"{self.max_clients} clients mod 2**{self.modulus_bits} allows at most "
                f"{limit} bits. Lower quantization_bits, raise modulus_bits or pass None"
            )
        object.__setattr__(self, "quantization_bits", bits)

    @property
    def bits(self) -> int:
        """``b``, the resolved number of quantization bits."""
        assert self.quantization_bits is not None  # resolved in __post_init__
        return self.quantization_bits

    @property
    def step(self) -> float:
        """Grid spacing ``2c / (2**b - 1)`` in the units of the update values."""
        return 2.0 * self.clipping_range / (2**self.bits - 1)

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """Unsigned integer dtype of encoded vectors and masks."""
        return np.uint32 if self.modulus_bits <= 32 else np.uint64

    @property
    def mask(self) -> int:
        """``2**k - 1``, the bit mask that reduces a dtype value mod ``2**k``."""
        return 2**self.modulus_bits - 1

    def error_bound(self, num_clients: int) -> float:
        """Return the maximum per-coordinate error of a decoded sum of ``num_clients``.

        The bound is ``num_clients * step / 2`` (rounding to the grid) plus
        ``num_clients * c * 2**-48`` (float64 arithmetic), against the sum of the clipped
        values.
        """
        return num_clients * (self.step / 2.0 + self.clipping_range * 2.0**-48)


def encode(values: np.ndarray, config: FixedPointConfig) -> tuple[np.ndarray, int]:
    """Clip and quantize a float vector into integers mod ``2**k``.

    Parameters
    ----------
    values : np.ndarray
        Float array of any shape. It is flattened in C order.
    config : FixedPointConfig
        Encoding parameters.

    Returns
    -------
    encoded : np.ndarray
        1-D array of ``config.dtype`` with values in ``[0, 2**b - 1]``.
    num_clipped : int
        Number of coordinates that were outside ``[-c, c]`` and were clipped.

    Raises
    ------
    ValueError
        If ``values`` contains NaN or infinity.
    """
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(flat)):
        num_bad = int(np.count_nonzero(~np.isfinite(flat)))
        raise ValueError(
            f"values contains {num_bad} NaN or infinite entries: secure aggregation can "
            "only encode finite updates. Check the local training for divergence"
        )
    c = config.clipping_range
    num_clipped = int(np.count_nonzero(np.abs(flat) > c))
    clipped = np.clip(flat, -c, c)
    grid = np.rint((clipped + c) / config.step)
    # Rounding of (x + c) / step can land one ulp outside [0, 2**b - 1] at the ends.
    grid = np.clip(grid, 0, 2**config.bits - 1)
    return grid.astype(config.dtype), num_clipped


def decode_sum(total: np.ndarray, num_clients: int, config: FixedPointConfig) -> np.ndarray:
    """Decode the sum of ``num_clients`` encodings back to a float64 vector.

    ``total`` must be the sum mod ``2**k`` of exactly ``num_clients`` outputs of
    :func:`encode` with the same ``config``. The result is within
    ``config.error_bound(num_clients)`` of the sum of the clipped float values.
    """
    if not 1 <= num_clients <= config.max_clients:
        raise ValueError(
            f"num_clients={num_clients!r} is out of range: expected 1 to "
            f"max_clients={config.max_clients}, because more clients could overflow the "
            "modulus. Raise max_clients in the FixedPointConfig"
        )
    grid_sum = np.asarray(total).astype(np.uint64) & np.uint64(config.mask)
    return grid_sum.astype(np.float64) * config.step - num_clients * config.clipping_range


def add_mod(a: np.ndarray, b: np.ndarray, config: FixedPointConfig) -> np.ndarray:
    """Return ``(a + b) mod 2**k`` as ``config.dtype``."""
    # Unsigned numpy arithmetic wraps mod 2**32 or 2**64; both are multiples of 2**k,
    # so reducing with the bit mask afterwards gives the result mod 2**k.
    total = a.astype(config.dtype, copy=False) + b.astype(config.dtype, copy=False)
    return total & config.dtype(config.mask)


def accumulate_mod(
    total: np.ndarray, value: np.ndarray, config: FixedPointConfig, *, negate: bool = False
) -> None:
    """Add (or with ``negate`` subtract) ``value`` to ``total`` in place, mod ``2**dtype bits``.

    ``total`` must be a writable array of ``config.dtype``. Unsigned NumPy arithmetic wraps,
    and ``2**k`` divides the wrap modulus, so a run of these calls followed by one
    :func:`reduce_mod` gives the sum mod ``2**k``, without a copy per term.
    """
    operation = np.subtract if negate else np.add
    operation(total, value.astype(config.dtype, copy=False), out=total)


def reduce_mod(total: np.ndarray, config: FixedPointConfig) -> np.ndarray:
    """Reduce ``total`` (of ``config.dtype``) mod ``2**k`` in place and return it."""
    np.bitwise_and(total, config.dtype(config.mask), out=total)
    return total


def subtract_mod(a: np.ndarray, b: np.ndarray, config: FixedPointConfig) -> np.ndarray:
    """Return ``(a - b) mod 2**k`` as ``config.dtype``."""
    difference = a.astype(config.dtype, copy=False) - b.astype(config.dtype, copy=False)
    return difference & config.dtype(config.mask)


# An update is a dict of named float arrays. Secure aggregation works on one flat vector,
# so both sides flatten in the order of a shared layout: (name, shape) pairs sorted by name.
Layout = tuple[tuple[str, tuple[int, ...]], ...]


def layout_of(update: Mapping[str, np.ndarray]) -> Layout:
    """Return the layout of ``update``: its ``(name, shape)`` pairs sorted by name."""
    return tuple((name, tuple(np.shape(update[name]))) for name in sorted(update))


def layout_size(layout: Layout) -> int:
    """Return the number of coordinates of a flattened update with ``layout``."""
    return sum(math.prod(shape) for _, shape in layout)


def flatten_update(update: Mapping[str, np.ndarray], layout: Layout) -> np.ndarray:
    """Concatenate the arrays of ``update`` in ``layout`` order into a 1-D float64 vector.

    Raises
    ------
    ValueError
        If ``update`` has missing or extra names, or an array's shape differs from the
        layout.
    """
    expected = [name for name, _ in layout]
    missing = sorted(set(expected) - set(update))
    extra = sorted(set(update) - set(expected))
    if missing or extra:
        raise ValueError(
            f"update does not match the aggregation layout: missing {missing}, unexpected "
            f"{extra}. Send exactly the adapter tensors that the server announced"
        )
    parts = []
    for name, shape in layout:
        array = np.asarray(update[name])
        if array.shape != shape:
            raise ValueError(
                f"update[{name!r}] has shape {array.shape}, but the aggregation layout "
                f"expects {shape}. Check that client and server use the same adapter config"
            )
        parts.append(array.astype(np.float64, copy=False).reshape(-1))
    if not parts:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate(parts)


def unflatten_update(vector: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """Split a 1-D vector into named arrays with the shapes of ``layout``."""
    if vector.shape != (layout_size(layout),):
        raise ValueError(
            f"vector has shape {vector.shape}, but the layout needs ({layout_size(layout)},)"
        )
    update = {}
    offset = 0
    for name, shape in layout:
        size = math.prod(shape)
        update[name] = vector[offset : offset + size].reshape(shape)
        offset += size
    return update
