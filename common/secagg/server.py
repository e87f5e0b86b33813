"""Server side of a SecAgg+ session: it routes keys and shares and unmasks only the sum."""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Sequence

import numpy as np

from common.secagg import masking, shamir
from common.secagg.fixed_point import (
    FixedPointConfig,
    Layout,
    accumulate_mod,
    decode_sum,
    layout_size,
    reduce_mod,
    subtract_mod,
    unflatten_update,
)
from common.secagg.messages import (
    SESSION_ID_BYTES,
    STAGE_ABORTED,
    STAGE_ADVERTISE_KEYS,
    STAGE_DONE,
    STAGE_MASKED_INPUT,
    STAGE_SETUP,
    STAGE_SHARE_KEYS,
    STAGE_UNMASK,
    AdvertiseKeysMessage,
    AggregateResult,
    ClientMessageT,
    ForwardedSharesMessage,
    MaskedInputMessage,
    PublicKeysMessage,
    SecAggAbort,
    SetupMessage,
    ShareKeysMessage,
    UnmaskRequest,
    UnmaskResponse,
    build_neighbour_graph,
    check_session,
    check_threshold,
    unpack_share,
)

logger = logging.getLogger(__name__)


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
        self, stage: str, messages: Sequence[ClientMessageT], expected: frozenset[int]
    ) -> dict[int, ClientMessageT]:
        by_id: dict[int, ClientMessageT] = {}
        for message in messages:
            check_session(message.session_id, self.session_id, stage)
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
        self.stage = STAGE_ABORTED
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
            accumulate_mod(total, by_id[u].masked_input, self.fixed_point)
        self.masked_sum = reduce_mod(total, self.fixed_point)
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
                seed_shares[owner].append(unpack_share(data))
            for owner, data in message.key_shares.items():
                key_shares[owner].append(unpack_share(data))

        # Self masks of the survivors and pairwise masks between survivors and dropouts.
        length = layout_size(self.layout)
        config = self.fixed_point
        mask_total = np.zeros(length, dtype=config.dtype)
        for u in sorted(self.masked):
            seed = self._reconstruct(u, seed_shares[u], "self-mask seed")
            masking.add_self_mask(mask_total, seed, config, session_id=self.session_id)
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
                masking.add_pairwise_mask(mask_total, seed, config, own_id=u, peer_id=v)
        reduce_mod(mask_total, config)

        # Masks are removed from the sum of at least `threshold` inputs, never from one.
        assert self.masked_sum is not None
        grid_sum = subtract_mod(self.masked_sum, mask_total, config)
        num_contributors = len(self.masked)
        vector = decode_sum(grid_sum, num_contributors, config)
        self.masked_sum = None
        self.stage = STAGE_DONE
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
