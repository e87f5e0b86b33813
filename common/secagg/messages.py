"""SecAgg+ messages, stage names and the helpers that client and server share.

Messages are frozen dataclasses whose fields are ints, floats, bytes, tuples, mappings from
client id to bytes, or numpy arrays, so that they map onto Flower's ConfigRecord and
ArrayRecord (:mod:`common.secagg.records`).
"""

from __future__ import annotations

import random
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from common.secagg.fixed_point import FixedPointConfig, Layout

STAGE_SETUP = "setup"
STAGE_ADVERTISE_KEYS = "advertise_keys"
STAGE_SHARE_KEYS = "share_keys"
STAGE_MASKED_INPUT = "masked_input"
STAGE_UNMASK = "unmask"
STAGE_DONE = "done"
STAGE_ABORTED = "aborted"

SESSION_ID_BYTES = 16
SEED_BYTES = 32
_ID_PAIR = struct.Struct(">QQ")
SHARE_PLAINTEXT = struct.Struct(">QQHHH")  # sender, recipient, share index, two lengths
_SHARE_INDEX = struct.Struct(">H")


class SecAggAbort(RuntimeError):
    """Secure aggregation cannot finish because too few clients remain.

    Attributes
    ----------
    stage : str
        Stage at which the protocol stopped.
    num_survivors : int
        Number of clients that responded at that stage, or that store the shares in question.
    threshold : int
        The threshold ``t`` of the session.
    """

    def __init__(self, stage: str, *, num_survivors: int, threshold: int, detail: str = "") -> None:
        self.stage = stage
        self.num_survivors = num_survivors
        self.threshold = threshold
        detail = detail or f"{num_survivors} clients remain, fewer than threshold={threshold}"
        super().__init__(
            f"secure aggregation aborted at stage {stage!r}: {detail}. No aggregate is "
            "produced for this round. Sample more clients per round, or lower threshold "
            "(it must stay above half of each client's share holders)"
        )


# --- messages --------------------------------------------------------------------------


@dataclass(frozen=True)
class SetupMessage:
    """Stage 0, server to one client: session parameters and the client's neighbours."""

    session_id: bytes
    participants: tuple[int, ...]
    neighbours: tuple[int, ...]
    threshold: int
    clipping_range: float
    modulus_bits: int
    quantization_bits: int
    layout: Layout

    def fixed_point(self) -> FixedPointConfig:
        """Return the fixed-point configuration of the session."""
        return FixedPointConfig(
            clipping_range=self.clipping_range,
            max_clients=len(self.participants),
            modulus_bits=self.modulus_bits,
            quantization_bits=self.quantization_bits,
        )

    def to_values(self) -> dict[str, Any]:
        """Return the fields as ints, floats, bytes, strings and lists of them.

        The layout becomes three lists: tensor names, the number of dimensions of each and
        all dimensions concatenated.
        """
        return {
            "session-id": self.session_id,
            "participants": list(self.participants),
            "neighbours": list(self.neighbours),
            "threshold": self.threshold,
            "clipping-range": self.clipping_range,
            "modulus-bits": self.modulus_bits,
            "quantization-bits": self.quantization_bits,
            "layout-names": [name for name, _ in self.layout],
            "layout-ndims": [len(shape) for _, shape in self.layout],
            "layout-dims": [dim for _, shape in self.layout for dim in shape],
        }

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> SetupMessage:
        """Rebuild a message from :meth:`to_values`; raise ValueError if it is malformed."""
        try:
            names = [str(name) for name in values["layout-names"]]
            ndims = [int(n) for n in values["layout-ndims"]]
            dims = [int(d) for d in values["layout-dims"]]
            if len(names) != len(ndims) or sum(ndims) != len(dims) or min(ndims, default=0) < 0:
                raise ValueError("the layout lists do not match")
            layout = []
            offset = 0
            for name, ndim in zip(names, ndims, strict=True):
                layout.append((name, tuple(dims[offset : offset + ndim])))
                offset += ndim
            return cls(
                session_id=bytes(values["session-id"]),
                participants=tuple(int(u) for u in values["participants"]),
                neighbours=tuple(int(v) for v in values["neighbours"]),
                threshold=int(values["threshold"]),
                clipping_range=float(values["clipping-range"]),
                modulus_bits=int(values["modulus-bits"]),
                quantization_bits=int(values["quantization-bits"]),
                layout=tuple(layout),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed secure aggregation setup message ({err!r})") from None


@dataclass(frozen=True)
class AdvertiseKeysMessage:
    """Stage 1, client to server: the client's two X25519 public keys (32 bytes each)."""

    client_id: int
    session_id: bytes
    c_public_key: bytes
    s_public_key: bytes


@dataclass(frozen=True)
class PublicKeysMessage:
    """Stage 1, server to one client: public keys of its neighbours that advertised keys."""

    session_id: bytes
    c_public_keys: Mapping[int, bytes]
    s_public_keys: Mapping[int, bytes]


@dataclass(frozen=True)
class ShareKeysMessage:
    """Stage 2, client to server: encrypted shares, keyed by recipient id."""

    client_id: int
    session_id: bytes
    ciphertexts: Mapping[int, bytes]


@dataclass(frozen=True)
class ForwardedSharesMessage:
    """Stage 2, server to one client: the encrypted shares addressed to it, by sender id."""

    session_id: bytes
    ciphertexts: Mapping[int, bytes]


@dataclass(frozen=True)
class MaskedInputMessage:
    """Stage 3, client to server: the masked fixed-point update ``y_u`` (1-D, uint)."""

    client_id: int
    session_id: bytes
    masked_input: np.ndarray


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 4, server to one client: the clients whose masked input arrived (``U3``)."""

    session_id: bytes
    survivors: tuple[int, ...]


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 4, client to server: revealed shares keyed by owner id.

    Each value is a 2-byte share index followed by the Shamir share. An owner appears in
    ``self_mask_shares`` (owner survived) or in ``key_shares`` (owner dropped), never both.
    """

    client_id: int
    session_id: bytes
    self_mask_shares: Mapping[int, bytes]
    key_shares: Mapping[int, bytes]


@dataclass(frozen=True)
class AggregateResult:
    """Outcome of a session: the float64 sum of the contributors' updates.

    ``error_bound`` is the maximum per-coordinate distance between ``update_sum`` and the
    exact sum of the clipped updates. Divide by ``num_contributors`` for the mean.
    """

    update_sum: dict[str, np.ndarray]
    num_contributors: int
    contributors: tuple[int, ...]
    error_bound: float


# --- helpers shared by client and server -------------------------------------------------


def build_neighbour_graph(
    participants: Sequence[int],
    num_neighbours: int | None = None,
    *,
    rng: random.Random | None = None,
) -> dict[int, frozenset[int]]:
    """Return the communication graph as a map from client id to its neighbours.

    ``num_neighbours=None``, or a value of at least ``len(participants) - 1``, gives the
    complete graph. An even value ``k`` gives a Harary graph ``H(k, n)`` on a random
    ordering of the participants: each client links to the ``k / 2`` clients before and
    after it on the ring, so every client has exactly ``k`` neighbours. ``rng`` shuffles
    the ring (default ``secrets.SystemRandom``).
    """
    ids = list(participants)
    if num_neighbours is None or num_neighbours >= len(ids) - 1:
        return {u: frozenset(v for v in ids if v != u) for u in ids}
    if num_neighbours < 2 or num_neighbours % 2:
        raise ValueError(
            f"num_neighbours={num_neighbours!r} is invalid: expected an even number of at "
            "least 2 (each client links to num_neighbours / 2 clients on each side of a "
            "ring), or None for the complete graph"
        )
    (rng or secrets.SystemRandom()).shuffle(ids)
    graph: dict[int, set[int]] = {u: set() for u in ids}
    for position, u in enumerate(ids):
        for offset in range(1, num_neighbours // 2 + 1):
            v = ids[(position + offset) % len(ids)]
            graph[u].add(v)
            graph[v].add(u)
    return {u: frozenset(neighbours) for u, neighbours in graph.items()}


def check_threshold(threshold: int, num_holders: int) -> None:
    """Raise ValueError unless ``num_holders / 2 < threshold <= num_holders``.

    ``num_holders`` is the number of share holders of one client (neighbours plus itself).
    A threshold above half of them is what makes revealing both shares of a client
    impossible, because no two disjoint groups of ``threshold`` holders exist.
    """
    if not (2 * threshold > num_holders and 2 <= threshold <= num_holders):
        raise ValueError(
            f"threshold={threshold!r} is invalid for {num_holders} share holders per client: "
            f"expected an integer above {num_holders / 2:g} (and at least 2) and at most "
            f"{num_holders}. Use threshold={num_holders // 2 + 1} or more"
        )


def pack_share(index: int, share: bytes) -> bytes:
    return _SHARE_INDEX.pack(index) + share


def unpack_share(data: bytes) -> tuple[int, bytes]:
    (index,) = _SHARE_INDEX.unpack(data[: _SHARE_INDEX.size])
    return index, data[_SHARE_INDEX.size :]


def share_associated_data(session_id: bytes, sender: int, recipient: int) -> bytes:
    return session_id + _ID_PAIR.pack(sender, recipient)


class ClientMessage(Protocol):
    @property
    def client_id(self) -> int: ...

    @property
    def session_id(self) -> bytes: ...


ClientMessageT = TypeVar("ClientMessageT", bound=ClientMessage)


def check_session(session_id: bytes, expected: bytes, where: str) -> None:
    if session_id != expected:
        raise ValueError(
            f"{where}: message belongs to another secure aggregation session "
            f"(session_id {session_id.hex()[:8]}…, expected {expected.hex()[:8]}…). Drop "
            "messages from earlier rounds"
        )
