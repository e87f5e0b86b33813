"""Shamir t-of-n secret sharing of byte strings over the prime field GF(2**256 + 297).

A secret is cut into 32-byte chunks. Each chunk is an integer below ``2**256`` and
therefore a field element, and each chunk gets its own random polynomial of degree
``threshold - 1`` whose constant term is the chunk (Shamir, "How to share a secret",
CACM 1979). Share ``x`` contains the evaluations of all chunk polynomials at ``x``, for
``x = 1 .. num_shares``.

Any ``threshold`` shares determine the polynomials by Lagrange interpolation at 0. Fewer
shares are consistent with every possible secret, because for each candidate constant term
there is exactly one polynomial of degree ``threshold - 1`` through them, so they carry no
information about the secret.

Share bytes are ``threshold`` (2 bytes, big-endian), ``secret length`` (4 bytes,
big-endian) and one 33-byte big-endian field element per chunk. The threshold is public,
and storing it lets :func:`combine` reject too few shares with a clear error.
"""

from __future__ import annotations

import random
import secrets
import struct
from collections.abc import Sequence

# The smallest prime above 2**256, so that every 32-byte chunk is a field element.
PRIME = 2**256 + 297
CHUNK_BYTES = 32
ELEMENT_BYTES = 33  # PRIME needs 257 bits
MAX_SHARES = 2**16 - 1

_HEADER = struct.Struct(">HI")  # threshold, secret length in bytes


class ShamirError(ValueError):
    """Invalid shares or parameters for Shamir secret sharing."""


def split(
    secret: bytes,
    *,
    threshold: int,
    num_shares: int,
    rng: random.Random | None = None,
) -> list[tuple[int, bytes]]:
    """Split ``secret`` into ``num_shares`` shares, any ``threshold`` of which recover it.

    Parameters
    ----------
    secret : bytes
        The secret, at least one byte.
    threshold : int
        Number of shares needed to recover the secret, ``1 <= threshold <= num_shares``.
    num_shares : int
        Number of shares to produce, at most 65535.
    rng : random.Random or None, default None
        Source of the polynomial coefficients. ``None`` uses ``secrets.SystemRandom``, the
        operating system's cryptographic generator. Pass a seeded ``random.Random`` only in
        tests: its output is predictable, and so would be the secret.

    Returns
    -------
    list of (int, bytes)
        ``(index, share)`` pairs with indices ``1 .. num_shares``.

    Raises
    ------
    TypeError
        If ``secret`` is not bytes.
    ShamirError
        If ``secret`` is empty or ``threshold`` or ``num_shares`` is out of range.
    """
    if not isinstance(secret, bytes | bytearray):
        raise TypeError(f"secret must be bytes, got {type(secret).__name__}")
    if len(secret) == 0:
        raise ShamirError("secret is empty: pass at least one byte to share")
    if not 1 <= num_shares <= MAX_SHARES:
        raise ShamirError(f"num_shares={num_shares!r} is out of range: expected 1 to {MAX_SHARES}")
    if not 1 <= threshold <= num_shares:
        raise ShamirError(
            f"threshold={threshold!r} is out of range: expected 1 to num_shares={num_shares}"
        )
    rng = rng if rng is not None else secrets.SystemRandom()

    chunks = [
        int.from_bytes(secret[start : start + CHUNK_BYTES], "big")
        for start in range(0, len(secret), CHUNK_BYTES)
    ]
    # One polynomial per chunk: coefficients[0] is the chunk, the rest are uniform in GF(p).
    polynomials = [
        [chunk] + [rng.randrange(PRIME) for _ in range(threshold - 1)] for chunk in chunks
    ]

    header = _HEADER.pack(threshold, len(secret))
    shares = []
    for x in range(1, num_shares + 1):
        values = [_evaluate(coefficients, x) for coefficients in polynomials]
        body = b"".join(value.to_bytes(ELEMENT_BYTES, "big") for value in values)
        shares.append((x, header + body))
    return shares


def combine(shares: Sequence[tuple[int, bytes]]) -> bytes:
    """Recover the secret from at least ``threshold`` shares made by :func:`split`.

    Raises
    ------
    ShamirError
        If there are fewer shares than the threshold stored in them, if two shares have the
        same index, if an index is out of range, or if the shares come from different
        splits (different threshold, length or size).
    """
    if not shares:
        raise ShamirError("shares is empty: pass at least threshold shares from split()")

    headers = set()
    for index, share in shares:
        if not 1 <= index <= MAX_SHARES:
            raise ShamirError(f"share index {index!r} is out of range: expected 1 to {MAX_SHARES}")
        if len(share) < _HEADER.size:
            raise ShamirError(
                f"share {index} is {len(share)} bytes, shorter than the {_HEADER.size}-byte "
                "header: pass shares exactly as split() returned them"
            )
        headers.add((share[: _HEADER.size], len(share)))
    if len(headers) != 1:
        raise ShamirError(
            "shares come from different splits (their threshold, secret length or size "
            "differ): pass shares of one secret only"
        )
    ((header, share_size),) = headers
    threshold, secret_length = _HEADER.unpack(header)
    num_chunks = -(-secret_length // CHUNK_BYTES)
    if share_size != _HEADER.size + num_chunks * ELEMENT_BYTES:
        raise ShamirError(
            f"shares are {share_size} bytes but a {secret_length}-byte secret needs "
            f"{_HEADER.size + num_chunks * ELEMENT_BYTES}: the shares are corrupted"
        )

    indices = [index for index, _ in shares]
    if len(set(indices)) != len(indices):
        duplicates = sorted({index for index in indices if indices.count(index) > 1})
        raise ShamirError(
            f"duplicate share indices {duplicates}: each share must come from a different holder"
        )
    if len(shares) < threshold:
        raise ShamirError(
            f"{len(shares)} shares cannot recover the secret: the threshold is {threshold}. "
            f"Collect at least {threshold - len(shares)} more shares"
        )

    selected = list(shares)[:threshold]
    chunks = []
    for chunk_index in range(num_chunks):
        start = _HEADER.size + chunk_index * ELEMENT_BYTES
        points = [
            (index, int.from_bytes(share[start : start + ELEMENT_BYTES], "big"))
            for index, share in selected
        ]
        value = interpolate_at_zero(points)
        if value >= 2 ** (8 * CHUNK_BYTES):
            raise ShamirError(
                "the shares are inconsistent (the recovered chunk is not a 32-byte value): "
                "one of them is corrupted or belongs to another secret"
            )
        chunks.append(value.to_bytes(CHUNK_BYTES, "big"))

    # The last chunk was encoded from fewer than 32 bytes, so its leading bytes are zero.
    last_length = secret_length - (num_chunks - 1) * CHUNK_BYTES
    chunks[-1] = chunks[-1][CHUNK_BYTES - last_length :]
    return b"".join(chunks)


def interpolate_at_zero(points: Sequence[tuple[int, int]]) -> int:
    """Return ``f(0)`` of the polynomial of degree ``len(points) - 1`` through ``points``.

    ``points`` are ``(x, y)`` pairs in GF(PRIME) with distinct nonzero ``x``.
    """
    result = 0
    for i, (x_i, y_i) in enumerate(points):
        # Lagrange basis at 0: prod_{j != i} x_j / (x_j - x_i).
        numerator = 1
        denominator = 1
        for j, (x_j, _) in enumerate(points):
            if j == i:
                continue
            numerator = numerator * x_j % PRIME
            denominator = denominator * (x_j - x_i) % PRIME
        result = (result + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    return result


def _evaluate(coefficients: list[int], x: int) -> int:
    # Horner's rule, highest degree first.
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % PRIME
    return value
