"""The secure aggregation benchmark's timing of one SecAgg+ session."""

from __future__ import annotations

from common.adapter import get_adapter_arrays
from common.config import RunConfig
from simulations.secagg_benchmark import synthetic_updates, time_plain, time_secure
from tests.tiny_models import tiny_lora_bert


def test_secure_session_times_add_up():
    initial = get_adapter_arrays(tiny_lora_bert(seed=0))
    cfg = RunConfig().replace(
        model={"lora_r": 2, "lora_alpha": 4.0},
        server={"secure_aggregation": True, "norm_bound": 20.0},
    )
    updates = synthetic_updates(initial, 4, seed=4, rank=2)

    assert time_plain(initial, updates, cfg) > 0
    times = time_secure(initial, updates, cfg)

    # The clients' stages run in parallel: the wait is at most the summed compute of
    # all clients, and at least a quarter of it for 4 clients.
    assert 0 < times["parallel_clients_s"] <= times["clients_total_s"]
    assert times["parallel_clients_s"] >= times["clients_total_s"] / 4
    assert times["server_s"] > 0
