"""SecAgg+ secure aggregation as client and server state machines with explicit messages.

The protocol follows SecAgg (Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017) with the sparse communication graph of
SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020). Stages, with ``U1 ⊇ U2 ⊇ U3`` the clients that responded at each stage:

0. setup: the server sends each participant the session id, the threshold ``t``, the
   fixed-point parameters, the update layout and the client's neighbours in the graph.
1. advertise keys: each client sends two X25519 public keys, ``c_pk`` (share encryption)
   and ``s_pk`` (pairwise masks). The server forwards each client its neighbours' keys.
2. share keys: each client ``u`` Shamir-shares its self-mask seed ``b_u`` and its mask
   private key ``s_sk_u`` t-of-n among its share holders (its neighbours in ``U1`` and
   itself), encrypts each holder's shares with AES-GCM and sends them through the server.
3. masked input: ``y_u = x_u + PRG(b_u) + Σ_{v in N(u) ∩ U2} ±PRG(s_uv)  (mod 2**k)``,
   where ``x_u`` is the fixed-point encoding and the sign is ``+`` when ``u < v``.
4. unmask: for each owner whose shares it stores, a client in ``U3`` reveals the share of
   ``b`` if the owner sent a masked input and the share of ``s_sk`` otherwise. The server
   rebuilds the self masks of ``U3`` and the pairwise masks between ``U3`` and ``U2 \\ U3``
   and subtracts them from the sum of the masked inputs.

Graph: ``num_neighbours=None`` connects every pair (the SecAgg baseline). SecAgg+ replaces
the complete graph with a sparse random one whose degree grows as ``O(log n)``. Here an even
``num_neighbours = k`` builds a k-regular Harary graph on a random ordering of the clients:
each client links to the ``k / 2`` clients on either side of it on the ring, so keys,
shares and masks grow with ``k`` instead of with the number of clients.

Threat model: the server is honest-but-curious (it runs this code but may inspect
everything it receives) and clients are honest. The server object stores the running sum
of the masked inputs and never one client's masked vector, and masks are only ever
subtracted from that sum, which contains at least ``t >= 2`` inputs. Each client responds
to the unmask request once, with exactly one of the two shares per owner. The threshold must
exceed half of each client's share holders, so two disjoint groups of ``t`` holders cannot
exist, and even a server that sends different survivor lists to different clients cannot
collect both ``b_u`` and ``s_sk_u``.

Messages are frozen dataclasses whose fields are ints, floats, bytes, tuples, mappings from
client id to bytes, or numpy arrays, so that they map onto Flower's ConfigRecord and
ArrayRecord.

NOTE: the signed messages and the consistency-check round with which Bonawitz et al.
protect against an actively malicious server are not implemented.
"""

from __future__ import annotations

import logging
import random
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.secagg import masking, shamir
from common.secagg.fixed_point import (
    FixedPointConfig,
    Layout,
    add_mod,
    decode_sum,
    encode,
    flatten_update,
    layout_size,
    subtract_mod,
    unflatten_update,
)

logger = logging.getLogger(__name__)

STAGE_SETUP = "setup"
STAGE_ADVERTISE_KEYS = "advertise_keys"
STAGE_SHARE_KEYS = "share_keys"
STAGE_MASKED_INPUT = "masked_input"
STAGE_UNMASK = "unmask"
_DONE = "done"
_ABORTED = "aborted"

SESSION_ID_BYTES = 16
SEED_BYTES = 32
_ID_PAIR = struct.Struct(">QQ")
_SHARE_PLAINTEXT = struct.Struct(">QQHHH")  # sender, recipient, share index, two lengths
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


def _pack_share(index: int, share: bytes) -> bytes:
    return _SHARE_INDEX.pack(index) + share


def _unpack_share(data: bytes) -> tuple[int, bytes]:
    (index,) = _SHARE_INDEX.unpack(data[: _SHARE_INDEX.size])
    return index, data[_SHARE_INDEX.size :]


def _share_associated_data(session_id: bytes, sender: int, recipient: int) -> bytes:
    return session_id + _ID_PAIR.pack(sender, recipient)


class _ClientMessage(Protocol):
    @property
    def client_id(self) -> int: ...

    @property
    def session_id(self) -> bytes: ...


_MessageT = TypeVar("_MessageT", bound=_ClientMessage)


def _check_session(session_id: bytes, expected: bytes, where: str) -> None:
    if session_id != expected:
        raise ValueError(
            f"{where}: message belongs to another secure aggregation session "
            f"(session_id {session_id.hex()[:8]}…, expected {expected.hex()[:8]}…). Drop "
            "messages from earlier rounds"
        )


# --- client --------------------------------------------------------------------------


class SecAggClient:
    """Client side of one secure aggregation session.

    Call :meth:`setup`, :meth:`share_keys`, :meth:`masked_input` and :meth:`unmask` in this
    order, each with the server's message of that stage. Each method returns the message
    to send back. A client object serves one session.

    Parameters
    ----------
    client_id : int
        Non-negative id of this client, as the server lists it in ``participants``.
    """

    def __init__(self, client_id: int) -> None:
        if client_id < 0:
            raise ValueError(f"client_id={client_id!r} is invalid: expected an integer >= 0")
        self.client_id = client_id
        self.num_clipped = 0
        self._stage = STAGE_SETUP
        self._setup: SetupMessage | None = None
        self._c_private_key: X25519PrivateKey | None = None
        self._s_private_key: X25519PrivateKey | None = None
        self._self_mask_seed: bytes | None = None
        self._c_public_keys: dict[int, bytes] = {}
        self._s_public_keys: dict[int, bytes] = {}
        # owner id -> (share index, share of b_owner, share of s_sk_owner)
        self._held_shares: dict[int, tuple[int, bytes, bytes]] = {}

    def _enter(self, stage: str, previous: str) -> None:
        if self._stage != previous:
            raise RuntimeError(
                f"client {self.client_id}: stage {stage!r} called while the session is at "
                f"{self._stage!r}. Call setup, share_keys, masked_input and unmask in order, "
                "once each"
            )

    def _session(self) -> SetupMessage:
        assert self._setup is not None  # set by setup(), which _enter makes run first
        return self._setup

    def setup(self, message: SetupMessage) -> AdvertiseKeysMessage:
        """Store the session parameters and return two fresh X25519 public keys."""
        self._enter(STAGE_SETUP, STAGE_SETUP)
        if self.client_id not in message.participants:
            raise ValueError(
                f"client {self.client_id} is not among the session participants: the setup "
                "message was sent to the wrong client"
            )
        if not set(message.neighbours) <= set(message.participants) - {self.client_id}:
            raise ValueError(
                f"client {self.client_id}: neighbours must be other participants of the session"
            )
        check_threshold(message.threshold, len(message.neighbours) + 1)
        message.fixed_point()  # validates the fixed-point parameters

        self._setup = message
        self._c_private_key, c_public_key = masking.generate_key_pair()
        self._s_private_key, s_public_key = masking.generate_key_pair()
        self._self_mask_seed = secrets.token_bytes(SEED_BYTES)
        self._stage = STAGE_ADVERTISE_KEYS
        return AdvertiseKeysMessage(
            client_id=self.client_id,
            session_id=message.session_id,
            c_public_key=c_public_key,
            s_public_key=s_public_key,
        )

    def share_keys(self, message: PublicKeysMessage) -> ShareKeysMessage:
        """Secret-share ``b_u`` and ``s_sk_u`` among the holders and encrypt their shares."""
        self._enter(STAGE_SHARE_KEYS, STAGE_ADVERTISE_KEYS)
        setup = self._session()
        _check_session(message.session_id, setup.session_id, "share_keys")
        assert self._c_private_key is not None
        assert self._s_private_key is not None
        assert self._self_mask_seed is not None

        # Keys of the neighbours that advertised keys (U1 ∩ N(u)).
        peers = set(message.c_public_keys)
        if peers != set(message.s_public_keys) or not peers <= set(setup.neighbours):
            raise ValueError(
                f"client {self.client_id}: public keys must come in c/s pairs and only from "
                "the neighbours announced at setup"
            )
        own_keys = [
            masking.public_key_bytes(self._c_private_key),
            masking.public_key_bytes(self._s_private_key),
        ]
        all_keys = own_keys + [message.c_public_keys[v] for v in peers]
        all_keys += [message.s_public_keys[v] for v in peers]
        if len(set(all_keys)) != len(all_keys):
            raise ValueError(
                f"client {self.client_id}: two advertised public keys are equal, so a client "
                "reused a key. Every client must generate fresh keys per session"
            )
        holders = sorted(peers | {self.client_id})
        if len(holders) < setup.threshold:
            raise SecAggAbort(
                STAGE_SHARE_KEYS,
                num_survivors=len(holders),
                threshold=setup.threshold,
                detail=f"client {self.client_id} has {len(holders)} share holders left "
                f"(itself and its neighbours with keys), fewer than threshold="
                f"{setup.threshold}",
            )
        self._c_public_keys = dict(message.c_public_keys)
        self._s_public_keys = dict(message.s_public_keys)

        # Shares of b_u and s_sk_u; holder holders[i] gets share index i + 1.
        seed_shares = shamir.split(
            self._self_mask_seed, threshold=setup.threshold, num_shares=len(holders)
        )
        key_shares = shamir.split(
            masking.private_key_to_bytes(self._s_private_key),
            threshold=setup.threshold,
            num_shares=len(holders),
        )
        ciphertexts = {}
        for holder, (index, seed_share), (_, key_share) in zip(
            holders, seed_shares, key_shares, strict=True
        ):
            if holder == self.client_id:
                self._held_shares[holder] = (index, seed_share, key_share)
                continue
            plaintext = (
                _SHARE_PLAINTEXT.pack(
                    self.client_id, holder, index, len(seed_share), len(key_share)
                )
                + seed_share
                + key_share
            )
            key = masking.share_encryption_key(
                self._c_private_key,
                message.c_public_keys[holder],
                session_id=setup.session_id,
                own_id=self.client_id,
                peer_id=holder,
            )
            ciphertexts[holder] = masking.encrypt(
                key,
                plaintext,
                associated_data=_share_associated_data(setup.session_id, self.client_id, holder),
            )
        self._stage = STAGE_SHARE_KEYS
        return ShareKeysMessage(
            client_id=self.client_id, session_id=setup.session_id, ciphertexts=ciphertexts
        )

    def masked_input(
        self, message: ForwardedSharesMessage, update: Mapping[str, np.ndarray]
    ) -> MaskedInputMessage:
        """Store the shares addressed to this client and return the masked update ``y_u``."""
        self._enter(STAGE_MASKED_INPUT, STAGE_SHARE_KEYS)
        setup = self._session()
        _check_session(message.session_id, setup.session_id, "masked_input")
        assert self._c_private_key is not None
        assert self._s_private_key is not None
        assert self._self_mask_seed is not None

        # Decrypt the shares from the neighbours that shared (U2 ∩ N(u)).
        senders = sorted(message.ciphertexts)
        unknown = set(senders) - set(self._c_public_keys)
        if unknown:
            raise ValueError(
                f"client {self.client_id}: shares from clients {sorted(unknown)} whose keys "
                "were never forwarded to this client"
            )
        for sender in senders:
            self._held_shares[sender] = self._decrypt_shares(setup, sender, message)
        if len(senders) + 1 < setup.threshold:
            raise SecAggAbort(
                STAGE_MASKED_INPUT,
                num_survivors=len(senders) + 1,
                threshold=setup.threshold,
                detail=f"client {self.client_id} received shares from {len(senders)} "
                f"neighbours, so with itself fewer than threshold={setup.threshold} remain",
            )

        # Encode, then add the self mask and one signed pairwise mask per sender.
        config = setup.fixed_point()
        vector = flatten_update(update, setup.layout)
        masked, self.num_clipped = encode(vector, config)
        if self.num_clipped:
            logger.warning(
                "masked_input: client %s clipped %d of %d values to [-%g, %g]; raise "
                "clipping_range if this happens often",
                self.client_id,
                self.num_clipped,
                vector.size,
                config.clipping_range,
                config.clipping_range,
            )
        length = masked.size
        masked = add_mod(
            masked,
            masking.self_mask(self._self_mask_seed, length, config, session_id=setup.session_id),
            config,
        )
        for sender in senders:
            seed = masking.pairwise_seed(
                self._s_private_key,
                self._s_public_keys[sender],
                session_id=setup.session_id,
                own_id=self.client_id,
                peer_id=sender,
            )
            pairwise = masking.pairwise_mask(
                seed, length, config, own_id=self.client_id, peer_id=sender
            )
            masked = add_mod(masked, pairwise, config)

        # The secrets now live only as shares; drop them so that a later leak of this
        # object cannot unmask the input.
        self._self_mask_seed = None
        self._s_private_key = None
        self._c_private_key = None
        self._stage = STAGE_MASKED_INPUT
        return MaskedInputMessage(
            client_id=self.client_id, session_id=setup.session_id, masked_input=masked
        )

    def _decrypt_shares(
        self, setup: SetupMessage, sender: int, message: ForwardedSharesMessage
    ) -> tuple[int, bytes, bytes]:
        assert self._c_private_key is not None
        key = masking.share_encryption_key(
            self._c_private_key,
            self._c_public_keys[sender],
            session_id=setup.session_id,
            own_id=self.client_id,
            peer_id=sender,
        )
        plaintext = masking.decrypt(
            key,
            message.ciphertexts[sender],
            associated_data=_share_associated_data(setup.session_id, sender, self.client_id),
        )
        owner, recipient, index, seed_length, key_length = _SHARE_PLAINTEXT.unpack(
            plaintext[: _SHARE_PLAINTEXT.size]
        )
        body = plaintext[_SHARE_PLAINTEXT.size :]
        if (owner, recipient) != (sender, self.client_id) or len(body) != (
            seed_length + key_length
        ):
            raise ValueError(
                f"client {self.client_id}: the shares from client {sender} are malformed"
            )
        return index, body[:seed_length], body[seed_length:]

    def unmask(self, message: UnmaskRequest) -> UnmaskResponse:
        """Reveal, for each owner, the share of ``b`` (survived) or of ``s_sk`` (dropped).

        Raises
        ------
        SecAggAbort
            If fewer than ``threshold`` clients survived, in total or among this client's
            neighbours and itself.
        """
        self._enter(STAGE_UNMASK, STAGE_MASKED_INPUT)
        setup = self._session()
        _check_session(message.session_id, setup.session_id, "unmask")

        survivors = set(message.survivors)
        if self.client_id not in survivors:
            raise ValueError(
                f"client {self.client_id} is missing from the survivors of its own unmask "
                "request: the server lost its masked input, so it must not reveal shares"
            )
        if not survivors <= set(setup.participants):
            raise ValueError(
                f"client {self.client_id}: survivors {sorted(survivors - set(setup.participants))} "
                "are not participants of the session"
            )
        local_survivors = survivors & (set(setup.neighbours) | {self.client_id})
        if len(survivors) < setup.threshold or len(local_survivors) < setup.threshold:
            raise SecAggAbort(
                STAGE_UNMASK,
                num_survivors=len(local_survivors),
                threshold=setup.threshold,
                detail=f"{len(survivors)} clients survived, {len(local_survivors)} of them "
                f"among client {self.client_id} and its neighbours; both must reach "
                f"threshold={setup.threshold}",
            )
        missing = (survivors & set(setup.neighbours)) - set(self._held_shares)
        if missing:
            raise ValueError(
                f"client {self.client_id}: survivors {sorted(missing)} never sent it shares, "
                "so the survivor list is inconsistent"
            )

        # Exactly one share per owner, and one response per session (enforced by the stage).
        self_mask_shares = {}
        key_shares = {}
        for owner, (index, seed_share, key_share) in self._held_shares.items():
            if owner in survivors:
                self_mask_shares[owner] = _pack_share(index, seed_share)
            else:
                key_shares[owner] = _pack_share(index, key_share)
        self._held_shares = {}
        self._stage = _DONE
        return UnmaskResponse(
            client_id=self.client_id,
            session_id=setup.session_id,
            self_mask_shares=self_mask_shares,
            key_shares=key_shares,
        )


# --- server --------------------------------------------------------------------------


class SecAggServer:
    """Server side of one secure aggregation session.

    Call :meth:`setup`, :meth:`receive_keys`, :meth:`receive_shares`,
    :meth:`receive_masked_inputs` and :meth:`unmask` in this order. Each ``receive`` method
    takes the messages of the clients that responded at the previous stage (a client whose
    message is missing has dropped) and returns the next message for each of them.

    The server stores public keys, the client sets of each stage and ``masked_sum``, the
    running sum of the masked inputs. It never stores one client's masked or unmasked
    vector.

    Parameters
    ----------
    participants : sequence of int
        Distinct, non-negative ids of the sampled clients, at least 2.
    threshold : int
        ``t``, the number of share holders needed to rebuild a client's secret. It must
        exceed half of each client's share holders (``num_neighbours + 1``, or the number
        of participants for the complete graph), so more than half of them must survive.
    clipping_range : float
        Each update coordinate is clipped to ``[-clipping_range, clipping_range]``.
    layout : Layout
        Names and shapes of the update arrays, as :func:`layout_of` returns them.
    modulus_bits : int, default 32
        Arithmetic is mod ``2**modulus_bits``; see :class:`FixedPointConfig`.
    num_neighbours : int or None, default None
        ``None`` for the complete graph (SecAgg), or an even number of neighbours per
        client for the SecAgg+ Harary graph.
    rng : random.Random or None, default None
        Shuffles the graph ring. ``None`` uses ``secrets.SystemRandom``.
    """

    def __init__(
        self,
        participants: Sequence[int],
        *,
        threshold: int,
        clipping_range: float,
        layout: Layout,
        modulus_bits: int = 32,
        num_neighbours: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        ids = tuple(sorted(participants))
        if len(ids) < 2 or len(set(ids)) != len(ids) or ids[0] < 0:
            raise ValueError(
                f"participants={list(participants)!r} is invalid: expected at least 2 "
                "distinct non-negative client ids"
            )
        self.participants = ids
        self.threshold = threshold
        self.layout = layout
        self.fixed_point = FixedPointConfig(
            clipping_range=clipping_range, max_clients=len(ids), modulus_bits=modulus_bits
        )
        self.neighbours = build_neighbour_graph(ids, num_neighbours, rng=rng)
        for neighbours in self.neighbours.values():
            check_threshold(threshold, len(neighbours) + 1)
        self.session_id = secrets.token_bytes(SESSION_ID_BYTES)
        self.stage = STAGE_SETUP
        self.c_public_keys: dict[int, bytes] = {}
        self.s_public_keys: dict[int, bytes] = {}
        self.advertised: frozenset[int] = frozenset()  # U1
        self.shared: frozenset[int] = frozenset()  # U2
        self.masked: frozenset[int] = frozenset()  # U3
        self.masked_sum: np.ndarray | None = None

    # --- bookkeeping ---

    def _enter(self, stage: str, previous: str) -> None:
        if self.stage != previous:
            raise RuntimeError(
                f"server: stage {stage!r} called while the session is at {self.stage!r}. "
                "Call setup, receive_keys, receive_shares, receive_masked_inputs and unmask "
                "in order, once each"
            )

    def _collect(
        self, stage: str, messages: Sequence[_MessageT], expected: frozenset[int]
    ) -> dict[int, _MessageT]:
        by_id: dict[int, _MessageT] = {}
        for message in messages:
            _check_session(message.session_id, self.session_id, stage)
            if message.client_id not in expected:
                raise ValueError(
                    f"{stage}: unexpected message from client {message.client_id}, which is "
                    "not among the clients of the previous stage"
                )
            if message.client_id in by_id:
                raise ValueError(f"{stage}: client {message.client_id} sent two messages")
            by_id[message.client_id] = message
        num_dropped = len(expected) - len(by_id)
        logger.info(
            "%s: received messages from %d of %d clients (%d dropped)",
            stage,
            len(by_id),
            len(expected),
            num_dropped,
        )
        return by_id

    def _require(self, stage: str, survivors: set[int] | frozenset[int]) -> None:
        """Abort unless ``survivors`` and each survivor's neighbourhood reach the threshold."""
        if len(survivors) < self.threshold:
            self._abort()
            raise SecAggAbort(stage, num_survivors=len(survivors), threshold=self.threshold)
        for client_id in sorted(survivors):
            local = len(self.neighbours[client_id] & survivors) + 1
            if local < self.threshold:
                self._abort()
                raise SecAggAbort(
                    stage,
                    num_survivors=local,
                    threshold=self.threshold,
                    detail=f"client {client_id} has {local - 1} surviving neighbours, so "
                    f"with itself fewer than threshold={self.threshold}. Raise "
                    "num_neighbours",
                )

    def _abort(self) -> None:
        self.stage = _ABORTED
        self.masked_sum = None

    # --- stages ---

    def setup(self) -> dict[int, SetupMessage]:
        """Return the setup message for each participant (stage 0)."""
        self._enter(STAGE_SETUP, STAGE_SETUP)
        logger.info(
            "setup: %d participants, threshold %d, %d neighbours per client, "
            "%d-bit modulus, %d quantization bits",
            len(self.participants),
            self.threshold,
            len(self.neighbours[self.participants[0]]),
            self.fixed_point.modulus_bits,
            self.fixed_point.bits,
        )
        self.stage = STAGE_ADVERTISE_KEYS
        return {
            client_id: SetupMessage(
                session_id=self.session_id,
                participants=self.participants,
                neighbours=tuple(sorted(self.neighbours[client_id])),
                threshold=self.threshold,
                clipping_range=self.fixed_point.clipping_range,
                modulus_bits=self.fixed_point.modulus_bits,
                quantization_bits=self.fixed_point.bits,
                layout=self.layout,
            )
            for client_id in self.participants
        }

    def receive_keys(
        self, messages: Sequence[AdvertiseKeysMessage]
    ) -> dict[int, PublicKeysMessage]:
        """Store the advertised public keys and forward each client its neighbours' keys."""
        self._enter(STAGE_ADVERTISE_KEYS, STAGE_ADVERTISE_KEYS)
        by_id = self._collect(STAGE_ADVERTISE_KEYS, messages, frozenset(self.participants))
        keys = [m.c_public_key for m in by_id.values()] + [m.s_public_key for m in by_id.values()]
        if any(len(key) != masking.KEY_BYTES for key in keys) or len(set(keys)) != len(keys):
            raise ValueError(
                f"{STAGE_ADVERTISE_KEYS}: public keys must be distinct {masking.KEY_BYTES}-byte "
                "X25519 keys; a client sent a malformed or reused key"
            )
        self._require(STAGE_ADVERTISE_KEYS, set(by_id))

        self.advertised = frozenset(by_id)
        self.c_public_keys = {u: m.c_public_key for u, m in by_id.items()}
        self.s_public_keys = {u: m.s_public_key for u, m in by_id.items()}
        self.stage = STAGE_SHARE_KEYS
        replies = {}
        for u in sorted(self.advertised):
            peers = self.neighbours[u] & self.advertised
            replies[u] = PublicKeysMessage(
                session_id=self.session_id,
                c_public_keys={v: self.c_public_keys[v] for v in sorted(peers)},
                s_public_keys={v: self.s_public_keys[v] for v in sorted(peers)},
            )
        return replies

    def receive_shares(
        self, messages: Sequence[ShareKeysMessage]
    ) -> dict[int, ForwardedSharesMessage]:
        """Route each encrypted share to its recipient (the server cannot read them)."""
        self._enter(STAGE_SHARE_KEYS, STAGE_SHARE_KEYS)
        by_id = self._collect(STAGE_SHARE_KEYS, messages, self.advertised)
        for u, message in by_id.items():
            expected = self.neighbours[u] & self.advertised
            if set(message.ciphertexts) != expected:
                raise ValueError(
                    f"{STAGE_SHARE_KEYS}: client {u} addressed shares to "
                    f"{sorted(message.ciphertexts)}, expected its neighbours with keys "
                    f"{sorted(expected)}"
                )
        self._require(STAGE_SHARE_KEYS, set(by_id))

        self.shared = frozenset(by_id)
        self.stage = STAGE_MASKED_INPUT
        return {
            u: ForwardedSharesMessage(
                session_id=self.session_id,
                ciphertexts={
                    v: by_id[v].ciphertexts[u] for v in sorted(self.neighbours[u] & self.shared)
                },
            )
            for u in sorted(self.shared)
        }

    def receive_masked_inputs(
        self, messages: Sequence[MaskedInputMessage]
    ) -> dict[int, UnmaskRequest]:
        """Add the masked inputs into ``masked_sum`` and ask the survivors to unmask."""
        self._enter(STAGE_MASKED_INPUT, STAGE_MASKED_INPUT)
        by_id = self._collect(STAGE_MASKED_INPUT, messages, self.shared)
        length = layout_size(self.layout)
        for u, message in by_id.items():
            vector = message.masked_input
            if vector.shape != (length,) or vector.dtype != self.fixed_point.dtype:
                raise ValueError(
                    f"{STAGE_MASKED_INPUT}: client {u} sent an array of shape {vector.shape} "
                    f"and dtype {vector.dtype}, expected ({length},) and "
                    f"{np.dtype(self.fixed_point.dtype)}"
                )
        self._require(STAGE_MASKED_INPUT, set(by_id))
        num_dropped = len(self.shared) - len(by_id)
        if num_dropped:
            logger.warning(
                "%s: %d clients dropped after sharing keys; their pairwise masks will be "
                "removed with their reconstructed keys",
                STAGE_MASKED_INPUT,
                num_dropped,
            )

        # Only the running sum is kept: no per-client vector outlives this loop.
        total = np.zeros(length, dtype=self.fixed_point.dtype)
        for u in sorted(by_id):
            total = add_mod(total, by_id[u].masked_input, self.fixed_point)
        self.masked_sum = total
        self.masked = frozenset(by_id)
        self.stage = STAGE_UNMASK
        survivors = tuple(sorted(self.masked))
        return {
            u: UnmaskRequest(session_id=self.session_id, survivors=survivors) for u in survivors
        }

    def unmask(self, messages: Sequence[UnmaskResponse]) -> AggregateResult:
        """Rebuild the masks from the revealed shares, remove them and decode the sum."""
        self._enter(STAGE_UNMASK, STAGE_UNMASK)
        by_id = self._collect(STAGE_UNMASK, messages, self.masked)
        if len(by_id) < self.threshold:
            self._abort()
            raise SecAggAbort(STAGE_UNMASK, num_survivors=len(by_id), threshold=self.threshold)
        dropped = self.shared - self.masked  # shared keys but sent no masked input

        # Gather the revealed shares by owner, checking each is the allowed kind.
        seed_shares: dict[int, list[tuple[int, bytes]]] = {u: [] for u in self.masked}
        key_shares: dict[int, list[tuple[int, bytes]]] = {v: [] for v in dropped}
        for w, message in by_id.items():
            holders_of = self.neighbours[w] | {w}
            if not set(message.self_mask_shares) <= self.masked & holders_of:
                raise ValueError(
                    f"{STAGE_UNMASK}: client {w} revealed self-mask shares of clients that "
                    "did not send a masked input or are not its neighbours"
                )
            if not set(message.key_shares) <= dropped & holders_of:
                raise ValueError(
                    f"{STAGE_UNMASK}: client {w} revealed key shares of clients that did "
                    "not drop or are not its neighbours"
                )
            for owner, data in message.self_mask_shares.items():
                seed_shares[owner].append(_unpack_share(data))
            for owner, data in message.key_shares.items():
                key_shares[owner].append(_unpack_share(data))

        # Self masks of the survivors and pairwise masks between survivors and dropouts.
        length = layout_size(self.layout)
        config = self.fixed_point
        mask_total = np.zeros(length, dtype=config.dtype)
        for u in sorted(self.masked):
            seed = self._reconstruct(u, seed_shares[u], "self-mask seed")
            mask = masking.self_mask(seed, length, config, session_id=self.session_id)
            mask_total = add_mod(mask_total, mask, config)
        for v in sorted(dropped):
            partners = sorted(self.neighbours[v] & self.masked)
            if not partners:
                continue
            key = masking.private_key_from_bytes(
                self._reconstruct(v, key_shares[v], "mask private key")
            )
            for u in partners:
                seed = masking.pairwise_seed(
                    key, self.s_public_keys[u], session_id=self.session_id, own_id=v, peer_id=u
                )
                # The mask that survivor u added for its dropped neighbour v.
                mask = masking.pairwise_mask(seed, length, config, own_id=u, peer_id=v)
                mask_total = add_mod(mask_total, mask, config)

        # Masks are removed from the sum of at least `threshold` inputs, never from one.
        assert self.masked_sum is not None
        grid_sum = subtract_mod(self.masked_sum, mask_total, config)
        num_contributors = len(self.masked)
        vector = decode_sum(grid_sum, num_contributors, config)
        self.masked_sum = None
        self.stage = _DONE
        logger.info(
            "%s: aggregated %d clients (%d dropped after sharing keys, %d responded to unmask)",
            STAGE_UNMASK,
            num_contributors,
            len(dropped),
            len(by_id),
        )
        return AggregateResult(
            update_sum=unflatten_update(vector, self.layout),
            num_contributors=num_contributors,
            contributors=tuple(sorted(self.masked)),
            error_bound=config.error_bound(num_contributors),
        )

    def _reconstruct(self, owner: int, shares: list[tuple[int, bytes]], secret_name: str) -> bytes:
        if len(shares) < self.threshold:
            self._abort()
            raise SecAggAbort(
                STAGE_UNMASK,
                num_survivors=len(shares),
                threshold=self.threshold,
                detail=f"only {len(shares)} holders revealed the {secret_name} of client {owner}, "
                f"fewer than threshold={self.threshold}",
            )
        try:
            return shamir.combine(shares)
        except shamir.ShamirError as err:
            self._abort()
            raise ValueError(
                f"{STAGE_UNMASK}: the shares of the {secret_name} of client {owner} are "
                f"invalid ({err})"
            ) from None
