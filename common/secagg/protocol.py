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

The protocol is split into :mod:`common.secagg.messages` (stages, messages, graph and
threshold rules), :mod:`common.secagg.client` and :mod:`common.secagg.server`; this module
re-exports them. :mod:`common.secagg.records` maps the messages onto Flower records.

NOTE: the signed messages and the consistency-check round with which Bonawitz et al.
protect against an actively malicious server are not implemented.
"""

from common.secagg.client import SecAggClient
from common.secagg.messages import (
    SEED_BYTES,
    SESSION_ID_BYTES,
    STAGE_ADVERTISE_KEYS,
    STAGE_MASKED_INPUT,
    STAGE_SETUP,
    STAGE_SHARE_KEYS,
    STAGE_UNMASK,
    AdvertiseKeysMessage,
    AggregateResult,
    ForwardedSharesMessage,
    MaskedInputMessage,
    PublicKeysMessage,
    SecAggAbort,
    SetupMessage,
    ShareKeysMessage,
    UnmaskRequest,
    UnmaskResponse,
    build_neighbour_graph,
    check_threshold,
)
from common.secagg.server import SecAggServer

__all__ = [
    "SEED_BYTES",
    "SESSION_ID_BYTES",
    "STAGE_ADVERTISE_KEYS",
    "STAGE_MASKED_INPUT",
    "STAGE_SETUP",
    "STAGE_SHARE_KEYS",
    "STAGE_UNMASK",
    "AdvertiseKeysMessage",
    "AggregateResult",
    "ForwardedSharesMessage",
    "MaskedInputMessage",
    "PublicKeysMessage",
    "SecAggAbort",
    "SecAggClient",
    "SecAggServer",
    "SetupMessage",
    "ShareKeysMessage",
    "UnmaskRequest",
    "UnmaskResponse",
    "build_neighbour_graph",
    "check_threshold",
]
