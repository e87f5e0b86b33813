"""Tests for the SecAgg+ protocol, driven in-process with real keys, shares and masks."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Collection, Mapping

import numpy as np
import pytest

from common.secagg import SecAggAbort, SecAggClient, SecAggServer, layout_of
from common.secagg.fixed_point import add_mod, decode_sum, encode, flatten_update
from common.secagg.protocol import (
    STAGE_ADVERTISE_KEYS,
    STAGE_MASKED_INPUT,
    STAGE_UNMASK,
    AggregateResult,
    UnmaskRequest,
    UnmaskResponse,
    build_neighbour_graph,
)

NUM_CLIENTS = 10
THRESHOLD = 6
CLIPPING_RANGE = 0.5


def make_updates(num_clients: int = NUM_CLIENTS, seed: int = 0) -> dict[int, dict]:
    rng = np.random.default_rng(seed)
    return {
        client_id: {
            "base_model.layers.0.attn.lora_A.weight": rng.normal(0, 0.05, (4, 16)).astype(
                np.float32
            ),
            "base_model.layers.0.attn.lora_B.weight": rng.normal(0, 0.05, (16, 4)).astype(
                np.float32
            ),
            "base_model.head.bias": rng.normal(0, 0.05, (3,)).astype(np.float32),
        }
        for client_id in range(num_clients)
    }


@dataclasses.dataclass
class Session:
    server: SecAggServer
    clients: dict[int, SecAggClient]
    updates: dict[int, dict]
    messages: list = dataclasses.field(default_factory=list)
    responses: list[UnmaskResponse] = dataclasses.field(default_factory=list)


def make_session(
    *, threshold: int = THRESHOLD, num_neighbours: int | None = None, seed: int = 0
) -> Session:
    updates = make_updates(seed=seed)
    server = SecAggServer(
        list(updates),
        threshold=threshold,
        clipping_range=CLIPPING_RANGE,
        layout=layout_of(updates[0]),
        num_neighbours=num_neighbours,
        rng=random.Random(seed),
    )
    clients = {client_id: SecAggClient(client_id) for client_id in updates}
    return Session(server, clients, updates)


def run_session(
    session: Session,
    *,
    drop_at_keys: Collection[int] = (),
    drop_at_shares: Collection[int] = (),
    drop_before_input: Collection[int] = (),
    drop_after_input: Collection[int] = (),
) -> AggregateResult:
    """Drive all stages; a client in a drop set sends nothing from that stage on."""
    server, clients = session.server, session.clients

    setup = server.setup()
    keys = [clients[u].setup(setup[u]) for u in setup if u not in drop_at_keys]
    public_keys = server.receive_keys(keys)
    shares = [clients[u].share_keys(public_keys[u]) for u in public_keys if u not in drop_at_shares]
    forwarded = server.receive_shares(shares)
    masked = [
        clients[u].masked_input(forwarded[u], session.updates[u])
        for u in forwarded
        if u not in drop_before_input
    ]
    requests = server.receive_masked_inputs(masked)
    session.responses = [
        clients[u].unmask(requests[u]) for u in requests if u not in drop_after_input
    ]
    session.messages = [setup, keys, public_keys, shares, forwarded, masked, requests]
    session.messages.append(session.responses)
    return server.unmask(session.responses)


def plain_sum(updates: dict[int, dict], contributors: Collection[int]) -> dict[str, np.ndarray]:
    names = updates[next(iter(contributors))]
    return {
        name: np.sum([updates[u][name].astype(np.float64) for u in contributors], axis=0)
        for name in names
    }


def exact_fixed_point_sum(session: Session, contributors: Collection[int]) -> np.ndarray:
    """Decode the unmasked sum of the contributors' encodings, as a trusted party would."""
    config = session.server.fixed_point
    layout = session.server.layout
    total = None
    for u in contributors:
        encoded, _ = encode(flatten_update(session.updates[u], layout), config)
        total = encoded if total is None else add_mod(total, encoded, config)
    return decode_sum(total, len(contributors), config)


def assert_matches_plain_sum(result: AggregateResult, session: Session, contributors) -> None:
    expected = plain_sum(session.updates, contributors)
    assert set(result.update_sum) == set(expected)
    config = session.server.fixed_point
    bound = len(contributors) * config.step / 2 + 1e-12
    assert result.error_bound <= bound
    for name, array in expected.items():
        assert result.update_sum[name].shape == array.shape
        assert np.max(np.abs(result.update_sum[name] - array)) <= bound, name
    # The sum is exact in fixed point: it equals the decoded sum of the encodings.
    vector = flatten_update(result.update_sum, session.server.layout)
    np.testing.assert_array_equal(vector, exact_fixed_point_sum(session, contributors))


# --- aggregation and dropouts ------------------------------------------------------------


def test_aggregate_equals_plain_sum():
    session = make_session()
    result = run_session(session)
    assert result.num_contributors == NUM_CLIENTS
    assert result.contributors == tuple(range(NUM_CLIENTS))
    assert_matches_plain_sum(result, session, range(NUM_CLIENTS))


def test_dropouts_before_and_after_masked_input():
    session = make_session(seed=1)
    result = run_session(session, drop_before_input={4}, drop_after_input={0, 7})
    contributors = [u for u in range(NUM_CLIENTS) if u != 4]
    assert result.num_contributors == 9
    assert result.contributors == tuple(contributors)
    assert_matches_plain_sum(result, session, contributors)


def test_dropouts_at_key_and_share_stages():
    session = make_session(seed=2)
    result = run_session(session, drop_at_keys={9}, drop_at_shares={3})
    contributors = [u for u in range(NUM_CLIENTS) if u not in (3, 9)]
    assert result.contributors == tuple(contributors)
    assert_matches_plain_sum(result, session, contributors)


def test_each_client_reveals_one_share_per_owner():
    session = make_session(seed=3)
    run_session(session, drop_before_input={4, 5}, drop_after_input={0, 7})
    survivors = set(range(NUM_CLIENTS)) - {4, 5}
    for response in session.responses:
        seed_owners = set(response.self_mask_shares)
        key_owners = set(response.key_shares)
        assert not seed_owners & key_owners
        assert seed_owners == survivors
        assert key_owners == {4, 5}


def test_unmask_responds_only_once():
    session = make_session()
    run_session(session)
    client = session.clients[1]
    request = UnmaskRequest(session_id=session.server.session_id, survivors=(1, 2, 3, 4, 5, 6))
    with pytest.raises(RuntimeError, match="once each"):
        client.unmask(request)


@pytest.mark.parametrize(
    "drops, stage",
    [
        ({"drop_at_keys": {0, 1, 2, 3, 4}}, STAGE_ADVERTISE_KEYS),
        ({"drop_before_input": {1, 3, 5, 7, 9}}, STAGE_MASKED_INPUT),
        ({"drop_at_shares": {0, 1}, "drop_before_input": {2, 3, 4}}, STAGE_MASKED_INPUT),
        ({"drop_after_input": {5, 6, 7, 8, 9}}, STAGE_UNMASK),
    ],
)
def test_five_dropouts_abort(drops, stage):
    session = make_session()
    with pytest.raises(SecAggAbort) as info:
        run_session(session, **drops)
    assert info.value.stage == stage
    assert info.value.num_survivors == 5
    assert info.value.threshold == THRESHOLD
    message = str(info.value)
    assert f"stage {stage!r}" in message
    assert "5 clients remain, fewer than threshold=6" in message
    assert "Sample more clients" in message
    assert session.server.masked_sum is None


def test_threshold_at_half_of_holders_rejected():
    updates = make_updates()
    with pytest.raises(ValueError, match="threshold=5 is invalid for 10 share holders"):
        SecAggServer(list(updates), threshold=5, clipping_range=1.0, layout=layout_of(updates[0]))


def test_client_counts_clipped_values():
    session = make_session()
    session.updates[2]["base_model.head.bias"] = np.array([0.9, -2.0, 0.1], dtype=np.float32)
    result = run_session(session)
    assert session.clients[2].num_clipped == 2
    assert session.clients[3].num_clipped == 0
    expected = sum(
        np.clip(session.updates[u]["base_model.head.bias"], -CLIPPING_RANGE, CLIPPING_RANGE)
        for u in range(NUM_CLIENTS)
    )
    np.testing.assert_allclose(
        result.update_sum["base_model.head.bias"], expected, atol=result.error_bound + 1e-6
    )


# --- what the server stores ----------------------------------------------------------------


def stored_values(obj, seen: set[int] | None = None):
    """Yield every ndarray and bytes reachable from ``obj`` through attributes and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray | bytes):
        yield obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from stored_values(key, seen)
            yield from stored_values(value, seen)
    elif isinstance(obj, list | tuple | set | frozenset):
        for item in obj:
            yield from stored_values(item, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for value in vars(obj).values():
            yield from stored_values(value, seen)


def assert_stores_no_client_vector(server: SecAggServer, session: Session, masked) -> None:
    config = server.fixed_point
    arrays = [value for value in stored_values(server) if isinstance(value, np.ndarray)]
    vector_length = sum(np.prod(shape, dtype=int) for _, shape in server.layout)
    for u, update in session.updates.items():
        vector = flatten_update(update, server.layout)
        encoded, _ = encode(vector, config)
        for array in arrays:
            assert not np.array_equal(array.reshape(-1), encoded), u
            assert not np.array_equal(array.reshape(-1), vector), u
            for tensor in update.values():
                assert not np.array_equal(array, tensor), u
    for message in masked:
        for array in arrays:
            assert not np.array_equal(array, message.masked_input), message.client_id
    assert sum(array.size == vector_length for array in arrays) <= 1


def test_server_never_stores_an_individual_update():
    session = make_session(seed=4)
    server, clients = session.server, session.clients
    setup = server.setup()
    keys = server.receive_keys([clients[u].setup(setup[u]) for u in setup])
    forwarded = server.receive_shares([clients[u].share_keys(keys[u]) for u in keys])
    masked = [
        clients[u].masked_input(forwarded[u], session.updates[u]) for u in forwarded if u != 8
    ]
    requests = server.receive_masked_inputs(masked)

    assert_stores_no_client_vector(server, session, masked)
    assert server.masked_sum is not None
    assert server.masked_sum.shape == masked[0].masked_input.shape

    responses = [clients[u].unmask(requests[u]) for u in requests if u != 2]
    result = server.unmask(responses)
    assert_stores_no_client_vector(server, session, masked)
    assert result.num_contributors == 9
    assert server.masked_sum is None


def test_messages_carry_only_plain_payloads():
    session = make_session()
    run_session(session, drop_before_input={1})

    def check(value) -> None:
        if dataclasses.is_dataclass(value):
            for item in dataclasses.fields(value):
                check(getattr(value, item.name))
        elif isinstance(value, Mapping):
            for key, item in value.items():
                assert isinstance(key, int | str)
                check(item)
        elif isinstance(value, list | tuple):
            for item in value:
                check(item)
        else:
            assert isinstance(value, bool | int | float | str | bytes | np.ndarray), type(value)

    for stage_messages in session.messages:
        check(stage_messages)


# --- protocol checks ----------------------------------------------------------------------


def test_client_rejects_survivor_list_without_itself():
    session = make_session()
    server, clients = session.server, session.clients
    setup = server.setup()
    keys = server.receive_keys([clients[u].setup(setup[u]) for u in setup])
    forwarded = server.receive_shares([clients[u].share_keys(keys[u]) for u in keys])
    clients[0].masked_input(forwarded[0], session.updates[0])
    request = UnmaskRequest(session_id=server.session_id, survivors=tuple(range(1, 10)))
    with pytest.raises(ValueError, match="missing from the survivors"):
        clients[0].unmask(request)


def test_client_aborts_when_few_survivors():
    session = make_session()
    server, clients = session.server, session.clients
    setup = server.setup()
    keys = server.receive_keys([clients[u].setup(setup[u]) for u in setup])
    forwarded = server.receive_shares([clients[u].share_keys(keys[u]) for u in keys])
    clients[0].masked_input(forwarded[0], session.updates[0])
    request = UnmaskRequest(session_id=server.session_id, survivors=(0, 1, 2, 3, 4))
    with pytest.raises(SecAggAbort, match="5 clients survived"):
        clients[0].unmask(request)


def test_messages_from_another_session_rejected():
    first, second = make_session(), make_session()
    setup = first.server.setup()
    second.server.setup()
    keys = [first.clients[u].setup(setup[u]) for u in setup]
    with pytest.raises(ValueError, match="another secure aggregation session"):
        second.server.receive_keys(keys)


def test_stage_order_enforced():
    session = make_session()
    with pytest.raises(RuntimeError, match="in order"):
        session.server.receive_keys([])
    with pytest.raises(RuntimeError, match="in order"):
        session.clients[0].unmask(UnmaskRequest(session_id=b"", survivors=()))


def test_tampered_share_rejected():
    session = make_session()
    server, clients = session.server, session.clients
    setup = server.setup()
    keys = server.receive_keys([clients[u].setup(setup[u]) for u in setup])
    forwarded = server.receive_shares([clients[u].share_keys(keys[u]) for u in keys])
    ciphertexts = dict(forwarded[0].ciphertexts)
    ciphertexts[1] = ciphertexts[2]  # a share for client 0 from client 2, relabelled as 1
    tampered = dataclasses.replace(forwarded[0], ciphertexts=ciphertexts)
    with pytest.raises(ValueError, match="authentication failed"):
        clients[0].masked_input(tampered, session.updates[0])


# --- SecAgg+ sparse graph --------------------------------------------------------------------


def test_harary_graph_is_regular_and_symmetric():
    graph = build_neighbour_graph(range(10), 4, rng=random.Random(0))
    assert set(graph) == set(range(10))
    for u, neighbours in graph.items():
        assert len(neighbours) == 4
        assert u not in neighbours
        for v in neighbours:
            assert u in graph[v]
    complete = build_neighbour_graph(range(5))
    assert all(len(neighbours) == 4 for neighbours in complete.values())
    with pytest.raises(ValueError, match="even"):
        build_neighbour_graph(range(10), 3)


def test_sparse_graph_aggregate_with_dropouts():
    session = make_session(threshold=4, num_neighbours=6, seed=5)
    result = run_session(session, drop_before_input={2}, drop_after_input={6})
    contributors = [u for u in range(NUM_CLIENTS) if u != 2]
    assert result.contributors == tuple(contributors)
    assert_matches_plain_sum(result, session, contributors)
    shares_sent = session.messages[3]
    assert all(len(message.ciphertexts) == 6 for message in shares_sent)


def test_sparse_graph_aborts_when_neighbourhood_drops():
    session = make_session(threshold=3, num_neighbours=4, seed=6)
    neighbours = sorted(session.server.neighbours[0])
    with pytest.raises(SecAggAbort, match="surviving neighbours") as info:
        run_session(session, drop_before_input=neighbours[:3])
    assert info.value.stage == STAGE_MASKED_INPUT
    assert info.value.num_survivors < 3


# --- a server that deviates from the protocol ---------------------------------------------


def start_session() -> tuple[Session, dict, dict]:
    """Run setup and key advertisement; return the session, setups and forwarded keys."""
    session = make_session()
    setup = session.server.setup()
    keys = session.server.receive_keys([session.clients[u].setup(setup[u]) for u in setup])
    return session, setup, keys


def test_client_rejects_setup_not_addressed_to_it():
    _, setup, _ = start_session()
    with pytest.raises(ValueError, match="not among the session participants"):
        SecAggClient(99).setup(setup[0])
    strangers = dataclasses.replace(setup[0], neighbours=(*setup[0].neighbours, 42))
    with pytest.raises(ValueError, match="neighbours must be other participants"):
        SecAggClient(0).setup(strangers)


def test_client_rejects_reused_or_foreign_public_keys():
    session, _, keys = start_session()
    client = session.clients[0]
    c_keys, s_keys = dict(keys[0].c_public_keys), dict(keys[0].s_public_keys)

    # Client 2's key forwarded as client 1's as well: a key reused across clients.
    reused = dataclasses.replace(keys[0], c_public_keys={**c_keys, 1: c_keys[2]})
    with pytest.raises(ValueError, match="reused a key"):
        client.share_keys(reused)

    # A key from outside the neighbours announced at setup.
    foreign = dataclasses.replace(
        keys[0], c_public_keys={**c_keys, 42: c_keys[1]}, s_public_keys={**s_keys, 42: s_keys[1]}
    )
    with pytest.raises(ValueError, match="only from the neighbours announced at setup"):
        client.share_keys(foreign)


def test_client_rejects_inconsistent_survivors():
    session = make_session()
    server, clients = session.server, session.clients
    setup = server.setup()
    keys = server.receive_keys([clients[u].setup(setup[u]) for u in setup])
    shares = [clients[u].share_keys(keys[u]) for u in keys if u != 9]  # 9 drops here
    forwarded = server.receive_shares(shares)
    clients[0].masked_input(forwarded[0], session.updates[0])

    outsiders = UnmaskRequest(session_id=server.session_id, survivors=(*range(9), 42))
    with pytest.raises(ValueError, match=r"survivors \[42\] are not participants"):
        clients[0].unmask(outsiders)
    # Client 9 never sent shares, so it cannot have sent a masked input either.
    phantom = UnmaskRequest(session_id=server.session_id, survivors=tuple(range(10)))
    with pytest.raises(ValueError, match=r"survivors \[9\] never sent it shares"):
        clients[0].unmask(phantom)


def test_no_message_carries_a_client_secret():
    # Each client's private keys and self-mask seed leave it only as Shamir shares inside
    # ciphertexts: no message of any stage contains their bytes.
    session = make_session()
    secrets_by_client = {}
    server, clients = session.server, session.clients
    setup = server.setup()
    keys = server.receive_keys([clients[u].setup(setup[u]) for u in setup])
    for u, client in clients.items():
        state = client.state_dict()
        secrets_by_client[u] = [
            bytes(state[name]) for name in ("c-private-key", "s-private-key", "self-mask-seed")
        ]
    forwarded = server.receive_shares([clients[u].share_keys(keys[u]) for u in keys])
    masked = [clients[u].masked_input(forwarded[u], session.updates[u]) for u in forwarded]
    requests = server.receive_masked_inputs(masked)
    responses = [clients[u].unmask(requests[u]) for u in requests]
    server.unmask(responses)

    blobs: list[bytes] = []

    def collect(value) -> None:
        if dataclasses.is_dataclass(value):
            for item in dataclasses.fields(value):
                collect(getattr(value, item.name))
        elif isinstance(value, Mapping):
            for item in value.values():
                collect(item)
        elif isinstance(value, list | tuple):
            for item in value:
                collect(item)
        elif isinstance(value, bytes):
            blobs.append(value)
        elif isinstance(value, np.ndarray):
            blobs.append(value.tobytes())

    collect([setup, keys, forwarded, masked, requests, responses])
    for u, secrets in secrets_by_client.items():
        for secret in secrets:
            assert len(secret) >= 32
            assert not any(secret in blob for blob in blobs), u
    # After its masked input, a client keeps neither private key nor the seed.
    assert all(
        name not in clients[0].state_dict()
        for name in ("c-private-key", "s-private-key", "self-mask-seed")
    )
