"""Client side of a SecAgg+ session: keys, shares and the masked input."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.secagg import masking, shamir
from common.secagg.fixed_point import encode, flatten_update, reduce_mod
from common.secagg.messages import (
    SEED_BYTES,
    SHARE_PLAINTEXT,
    STAGE_ADVERTISE_KEYS,
    STAGE_DONE,
    STAGE_MASKED_INPUT,
    STAGE_SETUP,
    STAGE_SHARE_KEYS,
    STAGE_UNMASK,
    AdvertiseKeysMessage,
    ForwardedSharesMessage,
    MaskedInputMessage,
    PublicKeysMessage,
    SecAggAbort,
    SetupMessage,
    ShareKeysMessage,
    UnmaskRequest,
    UnmaskResponse,
    check_session,
    check_threshold,
    pack_share,
    share_associated_data,
)

logger = logging.getLogger(__name__)


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

    def state_dict(self) -> dict[str, Any]:
        """Return the session state as ints, bytes, strings and lists of them.

        A Flower ClientApp is called once per message, possibly in another worker process,
        so the state travels in the node's ``Context.state`` between stages. Until
        :meth:`masked_input` has run it contains the private keys and the self-mask seed,
        so it must never leave the client.
        """
        owners = sorted(self._held_shares)
        peers = sorted(self._c_public_keys)
        state: dict[str, Any] = {
            "client-id": self.client_id,
            "stage": self._stage,
            "num-clipped": self.num_clipped,
            "peer-ids": peers,
            "c-public-keys": [self._c_public_keys[v] for v in peers],
            "s-public-keys": [self._s_public_keys[v] for v in peers],
            "held-owner-ids": owners,
            "held-indices": [self._held_shares[owner][0] for owner in owners],
            "held-seed-shares": [self._held_shares[owner][1] for owner in owners],
            "held-key-shares": [self._held_shares[owner][2] for owner in owners],
        }
        if self._setup is not None:
            state.update({f"setup/{key}": value for key, value in self._setup.to_values().items()})
        if self._c_private_key is not None:
            state["c-private-key"] = masking.private_key_to_bytes(self._c_private_key)
        if self._s_private_key is not None:
            state["s-private-key"] = masking.private_key_to_bytes(self._s_private_key)
        if self._self_mask_seed is not None:
            state["self-mask-seed"] = self._self_mask_seed
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> SecAggClient:
        """Rebuild a client from :meth:`state_dict`; raise ValueError if it is malformed."""
        try:
            client = cls(int(state["client-id"]))
            client._stage = str(state["stage"])
            client.num_clipped = int(state["num-clipped"])
            setup = {key[6:]: value for key, value in state.items() if key.startswith("setup/")}
            if setup:
                client._setup = SetupMessage.from_values(setup)
            if "c-private-key" in state:
                client._c_private_key = masking.private_key_from_bytes(state["c-private-key"])
            if "s-private-key" in state:
                client._s_private_key = masking.private_key_from_bytes(state["s-private-key"])
            if "self-mask-seed" in state:
                client._self_mask_seed = bytes(state["self-mask-seed"])
            peers = [int(v) for v in state["peer-ids"]]
            client._c_public_keys = dict(zip(peers, state["c-public-keys"], strict=True))
            client._s_public_keys = dict(zip(peers, state["s-public-keys"], strict=True))
            client._held_shares = {
                int(owner): (int(index), bytes(seed_share), bytes(key_share))
                for owner, index, seed_share, key_share in zip(
                    state["held-owner-ids"],
                    state["held-indices"],
                    state["held-seed-shares"],
                    state["held-key-shares"],
                    strict=True,
                )
            }
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed secure aggregation client state ({err!r})") from None
        return client

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

    @property
    def session(self) -> SetupMessage:
        """Parameters of the current session (threshold, fixed-point range, layout)."""
        if self._setup is None:
            raise RuntimeError(f"client {self.client_id}: no session before setup()")
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
        check_session(message.session_id, setup.session_id, "share_keys")
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
                SHARE_PLAINTEXT.pack(self.client_id, holder, index, len(seed_share), len(key_share))
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
                associated_data=share_associated_data(setup.session_id, self.client_id, holder),
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
        check_session(message.session_id, setup.session_id, "masked_input")
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
        masked = masked.astype(config.dtype)  # a private, writable copy to add masks to
        masking.add_self_mask(masked, self._self_mask_seed, config, session_id=setup.session_id)
        for sender in senders:
            seed = masking.pairwise_seed(
                self._s_private_key,
                self._s_public_keys[sender],
                session_id=setup.session_id,
                own_id=self.client_id,
                peer_id=sender,
            )
            masking.add_pairwise_mask(
                masked, seed, config, own_id=self.client_id, peer_id=sender
            )
        reduce_mod(masked, config)

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
            associated_data=share_associated_data(setup.session_id, sender, self.client_id),
        )
        owner, recipient, index, seed_length, key_length = SHARE_PLAINTEXT.unpack(
            plaintext[: SHARE_PLAINTEXT.size]
        )
        body = plaintext[SHARE_PLAINTEXT.size :]
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
        check_session(message.session_id, setup.session_id, "unmask")

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
                self_mask_shares[owner] = pack_share(index, seed_share)
            else:
                key_shares[owner] = pack_share(index, key_share)
        self._held_shares = {}
        self._stage = STAGE_DONE
        return UnmaskResponse(
            client_id=self.client_id,
            session_id=setup.session_id,
            self_mask_shares=self_mask_shares,
            key_shares=key_shares,
        )
