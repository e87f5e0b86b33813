"""SecAgg+ messages as Flower records, for the ServerApp and ClientApp message exchanges.

Every stage message travels as a ConfigRecord under :data:`CONFIG_KEY` in the message
content. A mapping from client id to bytes becomes two lists (ids and values), because
record keys are strings. The masked input travels as a ``uint32``/``uint64`` array under
:data:`MASKED_INPUT_KEY`. Client ids never travel in replies: the server takes the sender's
id from its own node registry, so a client cannot speak for another.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common.secagg.messages import (
    AdvertiseKeysMessage,
    ForwardedSharesMessage,
    MaskedInputMessage,
    PublicKeysMessage,
    SetupMessage,
    ShareKeysMessage,
    UnmaskRequest,
    UnmaskResponse,
)

CONFIG_KEY = "secagg"
MASKED_INPUT_KEY = "secagg-masked-input"

T = TypeVar("T")

# Message types of the ClientApp actions, one per stage ("<category>.<action>" in Flower).
SETUP_ACTION = "secagg_setup"
SHARE_KEYS_ACTION = "secagg_share_keys"
MASKED_INPUT_ACTION = "secagg_masked_input"
UNMASK_ACTION = "secagg_unmask"


class MalformedRecord(ValueError):
    """A secure aggregation record is missing a key or has a value of the wrong type."""


def _config(content: RecordDict) -> ConfigRecord:
    try:
        return content.config_records[CONFIG_KEY]
    except KeyError:
        raise MalformedRecord(f"message has no {CONFIG_KEY!r} config record") from None


def _bytes(record: ConfigRecord, key: str) -> bytes:
    value = record[key]
    if not isinstance(value, bytes):
        raise MalformedRecord(f"{key} is {type(value).__name__}, expected bytes")
    return value


def _list(record: ConfigRecord, key: str) -> list:
    value = record[key]
    if not isinstance(value, list):
        raise MalformedRecord(f"{key} is {type(value).__name__}, expected a list")
    return value


def _put_map(prefix: str, mapping: Mapping[int, bytes]) -> dict[str, list]:
    ids = sorted(mapping)
    return {f"{prefix}-ids": ids, f"{prefix}-values": [mapping[i] for i in ids]}


def _get_map(record: ConfigRecord, prefix: str) -> dict[int, bytes]:
    ids = _list(record, f"{prefix}-ids")
    values = _list(record, f"{prefix}-values")
    if len(ids) != len(values):
        raise MalformedRecord(f"{prefix}-ids and {prefix}-values differ in length")
    if len(set(ids)) != len(ids):
        raise MalformedRecord(f"{prefix}-ids lists a client twice")
    return {int(i): bytes(value) for i, value in zip(ids, values, strict=True)}


def _parse(description: str, build: Callable[[], T]) -> T:
    """Call ``build()`` and turn a missing key or wrong type into MalformedRecord."""
    try:
        return build()
    except MalformedRecord:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise MalformedRecord(f"malformed secure aggregation {description} ({err!r})") from None


# --- server to client ---------------------------------------------------------------------


def setup_content(message: SetupMessage, client_id: int) -> RecordDict:
    """Content of the setup message to client ``client_id``."""
    return RecordDict({CONFIG_KEY: ConfigRecord({"client-id": client_id, **message.to_values()})})


def read_setup(content: RecordDict) -> tuple[int, SetupMessage]:
    """Return the recipient's client id and the setup message."""
    record = _config(content)
    client_id = record.get("client-id")
    if isinstance(client_id, bool) or not isinstance(client_id, int):
        raise MalformedRecord(f"client-id is {client_id!r}, expected an integer")
    return client_id, SetupMessage.from_values(dict(record))


def public_keys_record(message: PublicKeysMessage) -> ConfigRecord:
    return ConfigRecord(
        {
            "session-id": message.session_id,
            **_put_map("c-public-keys", message.c_public_keys),
            **_put_map("s-public-keys", message.s_public_keys),
        }
    )


def read_public_keys(content: RecordDict) -> PublicKeysMessage:
    record = _config(content)
    return _parse(
        "public keys",
        lambda: PublicKeysMessage(
            session_id=_bytes(record, "session-id"),
            c_public_keys=_get_map(record, "c-public-keys"),
            s_public_keys=_get_map(record, "s-public-keys"),
        ),
    )


def forwarded_shares_record(message: ForwardedSharesMessage) -> ConfigRecord:
    return ConfigRecord(
        {"session-id": message.session_id, **_put_map("ciphertexts", message.ciphertexts)}
    )


def read_forwarded_shares(content: RecordDict) -> ForwardedSharesMessage:
    record = _config(content)
    return _parse(
        "forwarded shares",
        lambda: ForwardedSharesMessage(
            session_id=_bytes(record, "session-id"),
            ciphertexts=_get_map(record, "ciphertexts"),
        ),
    )


def unmask_request_record(message: UnmaskRequest) -> ConfigRecord:
    return ConfigRecord({"session-id": message.session_id, "survivors": list(message.survivors)})


def read_unmask_request(content: RecordDict) -> UnmaskRequest:
    record = _config(content)
    return _parse(
        "unmask request",
        lambda: UnmaskRequest(
            session_id=_bytes(record, "session-id"),
            survivors=tuple(int(u) for u in _list(record, "survivors")),
        ),
    )


# --- client to server ---------------------------------------------------------------------


def advertise_keys_record(message: AdvertiseKeysMessage) -> ConfigRecord:
    return ConfigRecord(
        {
            "session-id": message.session_id,
            "c-public-key": message.c_public_key,
            "s-public-key": message.s_public_key,
        }
    )


def read_advertise_keys(content: RecordDict, client_id: int) -> AdvertiseKeysMessage:
    record = _config(content)
    return _parse(
        "advertised keys",
        lambda: AdvertiseKeysMessage(
            client_id=client_id,
            session_id=_bytes(record, "session-id"),
            c_public_key=_bytes(record, "c-public-key"),
            s_public_key=_bytes(record, "s-public-key"),
        ),
    )


def share_keys_record(message: ShareKeysMessage) -> ConfigRecord:
    return ConfigRecord(
        {"session-id": message.session_id, **_put_map("ciphertexts", message.ciphertexts)}
    )


def read_share_keys(content: RecordDict, client_id: int) -> ShareKeysMessage:
    record = _config(content)
    return _parse(
        "shares",
        lambda: ShareKeysMessage(
            client_id=client_id,
            session_id=_bytes(record, "session-id"),
            ciphertexts=_get_map(record, "ciphertexts"),
        ),
    )


def masked_input_records(message: MaskedInputMessage) -> tuple[ConfigRecord, ArrayRecord]:
    """Session id and the masked vector, as a config record and an array record."""
    arrays = ArrayRecord({"y": Array(np.ascontiguousarray(message.masked_input))})
    return ConfigRecord({"session-id": message.session_id}), arrays


def read_masked_input(content: RecordDict, client_id: int) -> MaskedInputMessage:
    record = _config(content)

    def build() -> MaskedInputMessage:
        vector = content.array_records[MASKED_INPUT_KEY]["y"].numpy()
        return MaskedInputMessage(
            client_id=client_id, session_id=_bytes(record, "session-id"), masked_input=vector
        )

    return _parse("masked input", build)


def unmask_response_record(message: UnmaskResponse) -> ConfigRecord:
    return ConfigRecord(
        {
            "session-id": message.session_id,
            **_put_map("self-mask-shares", message.self_mask_shares),
            **_put_map("key-shares", message.key_shares),
        }
    )


def read_unmask_response(content: RecordDict, client_id: int) -> UnmaskResponse:
    record = _config(content)
    return _parse(
        "unmask response",
        lambda: UnmaskResponse(
            client_id=client_id,
            session_id=_bytes(record, "session-id"),
            self_mask_shares=_get_map(record, "self-mask-shares"),
            key_shares=_get_map(record, "key-shares"),
        ),
    )
