"""Key agreement, key derivation, mask expansion and share encryption for secure aggregation.

Every secret used by the protocol comes from X25519 (RFC 7748) key agreement or from
``secrets.token_bytes`` and is turned into a purpose-specific 32-byte key by HKDF-SHA256
(RFC 5869). The HKDF salt is the round's ``session_id`` and the ``info`` names the purpose
and the two client ids, so keys of different rounds, purposes and pairs are independent.

Masks are expanded with AES-256 in counter mode (keystream of an all-zero plaintext). AES-CTR
is a cryptographic PRG: without the key its output is indistinguishable from uniform bits,
which is what hides each client's input, and it is deterministic, so a client and the
server that later reconstructs the seed expand the same mask. A statistical generator such
as numpy's PCG64 would be deterministic too, but its state can be recovered from its
output, so it must not be used for masks. Each mask key comes from a fresh seed and is
used for one stream only, so the fixed all-zero counter block never repeats under one key.

Shares travel through the server encrypted with AES-256-GCM under a key agreed between
sender and recipient, with a random 96-bit nonce and the session id and both client ids as
associated data.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.secagg.fixed_point import FixedPointConfig, accumulate_mod, subtract_mod

KEY_BYTES = 32
NONCE_BYTES = 12  # AES-GCM standard nonce size

_PAIRWISE_MASK_INFO = b"fedads secagg pairwise mask v1"
_SELF_MASK_INFO = b"fedads secagg self mask v1"
_SHARE_ENCRYPTION_INFO = b"fedads secagg share encryption v1"
_ID_PAIR = struct.Struct(">QQ")


def generate_key_pair() -> tuple[X25519PrivateKey, bytes]:
    """Generate an X25519 key pair and return it as (private key, raw 32-byte public key)."""
    private_key = X25519PrivateKey.generate()
    return private_key, public_key_bytes(private_key)


def public_key_bytes(private_key: X25519PrivateKey) -> bytes:
    """Return the raw 32-byte public key of ``private_key``."""
    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def private_key_to_bytes(private_key: X25519PrivateKey) -> bytes:
    """Return the raw 32-byte private key, the form that is secret-shared."""
    return private_key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def private_key_from_bytes(data: bytes) -> X25519PrivateKey:
    """Load a raw 32-byte X25519 private key."""
    if len(data) != KEY_BYTES:
        raise ValueError(
            f"an X25519 private key is {KEY_BYTES} bytes, got {len(data)}: the "
            "reconstructed key is corrupted"
        )
    return X25519PrivateKey.from_private_bytes(data)


def agree(private_key: X25519PrivateKey, peer_public_key: bytes) -> bytes:
    """Return the raw X25519 shared secret of ``private_key`` and a peer's public key.

    Raises
    ------
    ValueError
        If the peer key is not 32 bytes or is a low-order point (shared secret all zero).
    """
    try:
        return private_key.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    except ValueError as err:
        raise ValueError(
            f"key agreement failed ({err}): the peer's public key is invalid. The peer must "
            "send a fresh X25519 public key"
        ) from None


def derive_key(
    secret: bytes, *, info: bytes, session_id: bytes, ids: tuple[int, int] = (0, 0)
) -> bytes:
    """Derive a 32-byte key from ``secret`` with HKDF-SHA256.

    ``ids`` are sorted before use, so both members of a pair derive the same key.
    """
    low, high = sorted(ids)
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=session_id,
        info=info + _ID_PAIR.pack(low, high),
    )
    return hkdf.derive(secret)


def pairwise_seed(
    private_key: X25519PrivateKey,
    peer_public_key: bytes,
    *,
    session_id: bytes,
    own_id: int,
    peer_id: int,
) -> bytes:
    """Return the mask seed ``s_uv`` shared by clients ``own_id`` and ``peer_id``.

    Both clients compute it from their own mask private key and the other's public key,
    and the server can compute it from a reconstructed private key of a dropped client.
    """
    shared = agree(private_key, peer_public_key)
    return derive_key(
        shared, info=_PAIRWISE_MASK_INFO, session_id=session_id, ids=(own_id, peer_id)
    )


def share_encryption_key(
    private_key: X25519PrivateKey,
    peer_public_key: bytes,
    *,
    session_id: bytes,
    own_id: int,
    peer_id: int,
) -> bytes:
    """Return the AES-GCM key that clients ``own_id`` and ``peer_id`` use for shares."""
    shared = agree(private_key, peer_public_key)
    return derive_key(
        shared, info=_SHARE_ENCRYPTION_INFO, session_id=session_id, ids=(own_id, peer_id)
    )


def _keystream_words(key: bytes, length: int, config: FixedPointConfig) -> np.ndarray:
    """Return ``length`` read-only words of ``config.dtype``'s width from AES-256-CTR."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"mask key must be {KEY_BYTES} bytes, got {len(key)}")
    if length < 0:
        raise ValueError(f"length={length!r} is invalid: expected a non-negative integer")
    itemsize = np.dtype(config.dtype).itemsize
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    # CTR mode streams: update() returns every byte, and finalize() returns none.
    keystream = encryptor.update(bytes(length * itemsize))
    encryptor.finalize()
    # Little-endian on every platform, so that client and server agree bit for bit.
    return np.frombuffer(keystream, dtype=np.dtype(config.dtype).newbyteorder("<"))


def expand_mask(key: bytes, length: int, config: FixedPointConfig) -> np.ndarray:
    """Expand a 32-byte key into ``length`` uniform integers mod ``2**k`` with AES-256-CTR.

    Returns a 1-D array of ``config.dtype``. The same key and length always give the same
    array.
    """
    words = _keystream_words(key, length, config)
    # 2**k divides 2**32 (or 2**64), so the low k bits of a uniform word are uniform.
    return words.astype(config.dtype) & config.dtype(config.mask)


def add_mask(
    total: np.ndarray, key: bytes, config: FixedPointConfig, *, negate: bool = False
) -> None:
    """Add (or subtract) :func:`expand_mask` of ``key`` to ``total`` in place.

    The words are added before reduction mod ``2**k``. Once the caller reduces the total
    (:func:`common.secagg.fixed_point.reduce_mod`), the result is the same, at one pass
    per mask instead of two copies.
    """
    accumulate_mod(total, _keystream_words(key, total.size, config), config, negate=negate)


def self_mask(
    seed: bytes, length: int, config: FixedPointConfig, *, session_id: bytes
) -> np.ndarray:
    """Return the self mask ``PRG(b_u)`` of a client from its seed ``b_u``."""
    key = derive_key(seed, info=_SELF_MASK_INFO, session_id=session_id)
    return expand_mask(key, length, config)


def add_self_mask(
    total: np.ndarray, seed: bytes, config: FixedPointConfig, *, session_id: bytes
) -> None:
    """Add :func:`self_mask` to ``total`` in place (unreduced, see :func:`add_mask`)."""
    add_mask(total, derive_key(seed, info=_SELF_MASK_INFO, session_id=session_id), config)


def add_pairwise_mask(
    total: np.ndarray, seed: bytes, config: FixedPointConfig, *, own_id: int, peer_id: int
) -> None:
    """Add :func:`pairwise_mask` to ``total`` in place (unreduced, see :func:`add_mask`)."""
    if own_id == peer_id:
        raise ValueError(f"own_id and peer_id are both {own_id}: a client has no mask with itself")
    add_mask(total, seed, config, negate=own_id > peer_id)


def pairwise_mask(
    seed: bytes, length: int, config: FixedPointConfig, *, own_id: int, peer_id: int
) -> np.ndarray:
    """Return the signed pairwise mask that client ``own_id`` adds for ``peer_id``.

    The client with the smaller id adds ``PRG(s_uv)`` and the other adds ``-PRG(s_uv)``
    mod ``2**k``, so the two masks cancel in the sum.
    """
    if own_id == peer_id:
        raise ValueError(f"own_id and peer_id are both {own_id}: a client has no mask with itself")
    mask = expand_mask(seed, length, config)
    if own_id < peer_id:
        return mask
    return subtract_mod(np.zeros_like(mask), mask, config)


def encrypt(key: bytes, plaintext: bytes, *, associated_data: bytes) -> bytes:
    """Encrypt with AES-256-GCM and return ``nonce || ciphertext || tag``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, ciphertext: bytes, *, associated_data: bytes) -> bytes:
    """Decrypt the output of :func:`encrypt`.

    Raises
    ------
    ValueError
        If the ciphertext was altered, was encrypted under another key or belongs to other
        associated data (another session, sender or recipient).
    """
    if len(ciphertext) < NONCE_BYTES + 16:
        raise ValueError(
            f"ciphertext is {len(ciphertext)} bytes, too short for a nonce and a tag: it "
            "was truncated in transit"
        )
    nonce, body = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
    try:
        return AESGCM(key).decrypt(nonce, body, associated_data)
    except InvalidTag:
        raise ValueError(
            "ciphertext authentication failed: it was altered, or it was encrypted for "
            "another recipient, sender or session"
        ) from None
