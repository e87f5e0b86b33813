"""Secure aggregation (SecAgg/SecAgg+): the server learns only the sum of client updates."""

from common.secagg.fixed_point import (
    FixedPointConfig,
    Layout,
    decode_sum,
    encode,
    flatten_update,
    layout_of,
    unflatten_update,
)
from common.secagg.protocol import (
    AggregateResult,
    SecAggAbort,
    SecAggClient,
    SecAggServer,
    build_neighbour_graph,
)

__all__ = [
    "AggregateResult",
    "FixedPointConfig",
    "Layout",
    "SecAggAbort",
    "SecAggClient",
    "SecAggServer",
    "build_neighbour_graph",
    "decode_sum",
    "encode",
    "flatten_update",
    "layout_of",
    "unflatten_update",
]
