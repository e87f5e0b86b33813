"""Cost of secure aggregation: SecAgg+ wall time over plain aggregation, side by side.

Run ``python -m simulations.secagg_benchmark``. For each client count (default 10 and
20) it draws synthetic updates of the default adapter (``ModelConfig()``, built with
:func:`common.model.build_lora_model`) and times, interleaved in one process:

- plain: :meth:`server.aggregation.GlobalAdapter.aggregate`, i.e. per-client validation
  and the weighted mean of updates received in the clear;
- secure: one whole SecAgg+ session run in-process, every client's stages (keys, Shamir
  shares, clipping, weighting, encoding, masks) and the server's (routing, the masked sum,
  mask reconstruction, decoding, the optimizer step), without message transport.

It prints the median seconds of each, the server's share of the secure time and the
ratios secure / plain. In a real round the clients run each stage in parallel, and the
server waits for the slowest of them before its own step. The round's wall time without
transport is therefore the server's time plus, for each client stage, the slowest
client's time in it; the table gives that and the summed compute of all parties.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence

import numpy as np

from common.adapter import get_adapter_arrays
from common.config import ModelConfig, RunConfig
from common.model import build_lora_model
from common.secagg.client import SecAggClient
from common.secagg.fixed_point import layout_of
from common.secagg.server import SecAggServer
from common.secagg.update import aggregation_layout, mean_from_sum, weighted_vector
from server.aggregation import ClientUpdate, GlobalAdapter
from server.secure_round import fixed_point_range, threshold_for


def synthetic_updates(
    initial: dict, num_clients: int, seed: int, *, rank: int
) -> list[ClientUpdate]:
    """Client updates ``initial + 0.01 * N(0, 1)`` of LoRA rank ``rank``.

    The example counts run from 10 to ``10 + num_clients - 1``.
    """
    rng = np.random.default_rng(seed)
    return [
        ClientUpdate(
            client_id=f"client-{i:03d}",
            arrays={
                name: (value + 0.01 * rng.standard_normal(value.shape)).astype(np.float32)
                for name, value in initial.items()
            },
            num_examples=10.0 + i,
            rank=rank,
        )
        for i in range(num_clients)
    ]


def time_plain(initial: dict, updates: Sequence[ClientUpdate], cfg: RunConfig) -> float:
    strategy = GlobalAdapter(initial, cfg)
    started = time.perf_counter()
    outcome = strategy.aggregate(updates, min_updates=2)
    elapsed = time.perf_counter() - started
    assert outcome.applied
    return elapsed


def time_secure(initial: dict, updates: Sequence[ClientUpdate], cfg: RunConfig) -> dict[str, float]:
    """Seconds of one in-process session.

    Returns the server's total, the clients' summed total, and ``parallel_clients_s``: the
    sum over client stages of the slowest client in each, what the server waits for when
    the clients run in parallel.
    """
    strategy = GlobalAdapter(initial, cfg)
    reference = strategy.sent_adapter(cfg.model.lora_r)
    layout = aggregation_layout(layout_of(reference))
    n = len(updates)
    stage_seconds: dict[str, list[float]] = {}  # client stage -> seconds of each client

    def on_client(index: int, name: str, stage):
        started = time.perf_counter()
        result = stage()
        stage_seconds.setdefault(name, [0.0] * n)[index] += time.perf_counter() - started
        return result

    server_seconds = 0.0

    def on_server(stage):
        nonlocal server_seconds
        started = time.perf_counter()
        result = stage()
        server_seconds += time.perf_counter() - started
        return result

    server = on_server(
        lambda: SecAggServer(
            list(range(n)),
            threshold=threshold_for(cfg, n),
            clipping_range=fixed_point_range(cfg),
            layout=layout,
            modulus_bits=cfg.server.secagg_modulus_bits,
            num_neighbours=cfg.server.secagg_num_neighbours or None,
        )
    )
    clients = [SecAggClient(i) for i in range(n)]
    setups = on_server(server.setup)
    keys = [on_client(i, "setup", lambda i=i: clients[i].setup(setups[i])) for i in range(n)]
    public = on_server(lambda: server.receive_keys(keys))
    shares = [
        on_client(i, "share_keys", lambda i=i: clients[i].share_keys(public[i])) for i in range(n)
    ]
    forwarded = on_server(lambda: server.receive_shares(shares))

    def masked_input(i: int):
        delta = {
            name: value.astype(np.float64) - reference[name]
            for name, value in updates[i].arrays.items()
        }
        vector, _ = weighted_vector(
            delta, weight=updates[i].num_examples, clip_norm=cfg.server.client_clip_norm
        )
        return clients[i].masked_input(forwarded[i], vector)

    inputs = [on_client(i, "masked_input", lambda i=i: masked_input(i)) for i in range(n)]
    requests = on_server(lambda: server.receive_masked_inputs(inputs))
    responses = [
        on_client(i, "unmask", lambda i=i: clients[i].unmask(requests[i])) for i in range(n)
    ]

    def finish() -> None:
        result = server.unmask(responses)
        mean, _, _ = mean_from_sum(result.update_sum, result.error_bound)
        outcome = strategy.apply_secure_mean(mean, [u.client_id for u in updates])
        assert outcome.applied

    on_server(finish)
    return {
        "server_s": server_seconds,
        "clients_total_s": sum(sum(seconds) for seconds in stage_seconds.values()),
        "parallel_clients_s": sum(max(seconds) for seconds in stage_seconds.values()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--num-clients",
        type=int,
        nargs="+",
        default=[10, 20],
        help="client counts to time (default: 10 20)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per mode, median reported (default: 3)"
    )
    parser.add_argument(
        "--num-neighbours",
        type=int,
        default=0,
        help="server.secagg-num-neighbours (0: every pair of clients, the default)",
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    model_cfg = ModelConfig()
    initial = get_adapter_arrays(build_lora_model(model_cfg, seed=0))
    num_values = sum(value.size for value in initial.values())
    cfg = RunConfig(model=model_cfg).replace(
        server={
            "secure_aggregation": True,
            "norm_bound": 20.0,
            "secagg_num_neighbours": args.num_neighbours,
        }
    )
    print(
        f"adapter: {len(initial)} tensors, {num_values} values ({model_cfg.name}, "
        f"r={model_cfg.lora_r}); modulus 2^{cfg.server.secagg_modulus_bits}, "
        f"threshold fraction {cfg.server.secagg_threshold_fraction}, "
        f"neighbours {args.num_neighbours or 'all'}"
    )
    header = (
        f"{'clients':>7} {'plain s':>9} {'secure s':>9} {'server s':>9} "
        f"{'slowest clients s':>18} {'secure/plain':>13} {'server/plain':>13} "
        f"{'wall/plain':>11}"
    )
    print(header)
    results = []
    for num_clients in args.num_clients:
        updates = synthetic_updates(initial, num_clients, seed=num_clients, rank=model_cfg.lora_r)
        plain, secure = [], []
        for _ in range(args.repeats):
            plain.append(time_plain(initial, updates, cfg))
            secure.append(time_secure(initial, updates, cfg))
        plain_s = statistics.median(plain)
        server_s = statistics.median(run["server_s"] for run in secure)
        total_s = statistics.median(run["server_s"] + run["clients_total_s"] for run in secure)
        slowest_s = statistics.median(run["parallel_clients_s"] for run in secure)
        wall_s = statistics.median(run["server_s"] + run["parallel_clients_s"] for run in secure)
        row = {
            "num_clients": num_clients,
            "plain_s": plain_s,
            "secure_total_s": total_s,
            "secure_server_s": server_s,
            "secure_parallel_clients_s": slowest_s,
            "secure_wall_s": wall_s,
            "secure_over_plain": total_s / plain_s,
            "server_over_plain": server_s / plain_s,
            "wall_over_plain": wall_s / plain_s,
        }
        results.append(row)
        print(
            f"{num_clients:>7} {plain_s:>9.3f} {total_s:>9.3f} {server_s:>9.3f} "
            f"{slowest_s:>18.3f} {row['secure_over_plain']:>13.1f} "
            f"{row['server_over_plain']:>13.1f} {row['wall_over_plain']:>11.1f}"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"num_values": num_values, "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
