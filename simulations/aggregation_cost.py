"""Server aggregation cost: time per round against the number of clients, payload ratios.

:func:`time_aggregation` times :meth:`server.aggregation.GlobalAdapter.aggregate`, the
call that :func:`server.loop.run_rounds` makes each round (validation, the robust rule
and the server optimizer step), over synthetic client updates of the real adapter
shape. :func:`payload_ratios` compares the adapter bytes that travel per client per round
with the base model's bytes for each wire dtype and FFA-LoRA. :func:`time_client_round`
measures one client's local round on the largest client, so that the aggregation's share
of a round can be stated.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Sequence

import numpy as np

from client.train import steps_per_round, train_local
from common.adapter import Arrays, get_adapter_arrays, payload_bytes, set_adapter_arrays, to_wire
from common.config import RunConfig
from common.model import base_model_bytes, build_lora_model, load_base_model, load_tokenizer
from common.text import encode_records
from server.aggregation import ClientUpdate, GlobalAdapter
from simulations.dataset import federated_data

logger = logging.getLogger(__name__)

CLIENT_COUNTS = (20, 25, 50, 100, 200)
# Values of server.robust: the weighted mean and the two coordinate-wise robust rules.
ROBUST_RULES = ("none", "median", "trimmed-mean")
# Standard deviation of each synthetic client's step from the global adapter. The timed
# work depends on the tensor shapes and the number of clients, not on this value.
STEP_STD = 0.01


def synthetic_updates(
    template: Arrays, count: int, *, rank: int, wire_dtype: str, seed: int = 0
) -> list[ClientUpdate]:
    """``count`` updates ``template + STEP_STD * N(0, 1)``, cast to ``wire_dtype``.

    Example counts vary between clients, so the weighted mean does real weighting.
    """
    rng = np.random.default_rng(seed)
    updates = []
    for index in range(count):
        arrays = {
            name: (value + STEP_STD * rng.standard_normal(value.shape)).astype(np.float32)
            for name, value in template.items()
        }
        wire = to_wire(arrays, wire_dtype)
        updates.append(
            ClientUpdate(
                client_id=f"client-{index:04d}",
                arrays=wire,
                num_examples=float(20 + index % 50),
                rank=rank,
                wire_bytes=payload_bytes(wire),
            )
        )
    return updates


def time_aggregation(
    cfg: RunConfig,
    *,
    client_counts: Sequence[int] = CLIENT_COUNTS,
    rules: Sequence[str] = ROBUST_RULES,
    repeats: int = 5,
) -> dict[str, dict[int, float]]:
    """Time ``GlobalAdapter.aggregate`` per robust rule and client count (median seconds).

    Every repetition runs every (client count, rule) pair once, so drift in the machine's
    load spreads over all of them instead of biasing one. Each call starts from a fresh
    :class:`GlobalAdapter`, as a round does after the previous aggregation. Updates are
    built before timing and are not counted.
    """
    model = build_lora_model(cfg.model, seed=cfg.seed)
    template = get_adapter_arrays(model)
    rank = cfg.model.lora_r
    updates = synthetic_updates(
        template, max(client_counts), rank=rank, wire_dtype=cfg.server.wire_dtype
    )
    logger.info(
        "aggregation: %s tensors, %s values per client update, %s wire",
        len(template),
        sum(value.size for value in template.values()),
        cfg.server.wire_dtype,
    )

    # One untimed call per rule first, so first-call costs (imports, allocator growth) are
    # not charged to the first client count.
    for rule in rules:
        GlobalAdapter(template, cfg.replace(server={"robust": rule})).aggregate(
            updates[: min(client_counts)], min_updates=1
        )

    timings: dict[str, dict[int, list[float]]] = {
        rule: {count: [] for count in client_counts} for rule in rules
    }
    for repeat in range(repeats):
        for count in client_counts:
            for rule in rules:
                rule_cfg = cfg.replace(server={"robust": rule})
                strategy = GlobalAdapter(template, rule_cfg)
                started = time.perf_counter()
                outcome = strategy.aggregate(updates[:count], min_updates=count)
                elapsed = time.perf_counter() - started
                if not outcome.applied or len(outcome.accepted) != count:
                    raise RuntimeError(
                        f"aggregation benchmark: {len(outcome.accepted)} of {count} synthetic "
                        f"updates were accepted with robust = {rule}, expected all of them"
                    )
                timings[rule][count].append(elapsed)
        logger.info("aggregation: repetition %s of %s done", repeat + 1, repeats)
    return {
        rule: {count: statistics.median(values) for count, values in by_count.items()}
        for rule, by_count in timings.items()
    }


def payload_ratios(cfg: RunConfig) -> list[dict[str, object]]:
    """Compute adapter bytes per client per round (one direction) over the base model's bytes.

    One row per setup: float32, float16 and bfloat16 wires, FFA-LoRA (only ``lora_B``
    travels) in float32 and float16, each with and without the trained head transform
    (``model.train-head``). The base model's bytes are those of its float32 parameters
    without any adapter.
    """
    base = base_model_bytes(load_base_model(cfg.model.name))
    setups = [
        ("float32", False, "float32"),
        ("float16", False, "float16"),
        ("bfloat16", False, "bfloat16"),
        ("FFA-LoRA", True, "float32"),
        ("FFA-LoRA + float16", True, "float16"),
    ]
    rows = []
    for train_head in (False, True):
        for name, ffa_lora, wire_dtype in setups:
            model_cfg = dataclasses.replace(cfg.model, ffa_lora=ffa_lora, train_head=train_head)
            arrays = get_adapter_arrays(build_lora_model(model_cfg, seed=cfg.seed))
            adapter = payload_bytes(to_wire(arrays, wire_dtype))
            rows.append(
                {
                    "setup": name,
                    "train_head": train_head,
                    "adapter_bytes": adapter,
                    "base_bytes": base,
                    "ratio": adapter / base,
                }
            )
    return rows


def time_client_round(cfg: RunConfig, *, repeats: int = 3) -> dict[str, float]:
    """Time one local round on the largest client, as the ClientApp runs it (median seconds).

    A round builds the LoRA model, loads the received adapter and trains
    ``steps_per_round`` DP-SGD steps (Poisson sampling, per-sample clipping, noise), like
    :func:`client.app.handle_train`. Tokenization is cached across rounds there, so it is
    not timed. The noise multiplier is fixed at 1.0 because it does not change the work.
    """
    data = federated_data(cfg.data, cfg.seed)
    tokenizer = load_tokenizer(cfg.model.name)
    largest = max(data.partitions, key=len)
    examples = encode_records(tokenizer, largest, max_length=cfg.model.max_length)
    steps = steps_per_round(len(examples), cfg.train.batch_size, cfg.train.local_epochs)
    received = get_adapter_arrays(build_lora_model(cfg.model, seed=cfg.seed))

    timings = []
    for repeat in range(repeats):
        started = time.perf_counter()
        model = build_lora_model(cfg.model, seed=cfg.seed)
        set_adapter_arrays(model, received)
        train_local(
            model,
            examples,
            train=cfg.train,
            privacy=cfg.privacy,
            noise_multiplier=1.0 if cfg.privacy.dp else 0.0,
            pad_token_id=int(tokenizer.pad_token_id or 0),
            seed=repeat,
            steps=steps,
        )
        timings.append(time.perf_counter() - started)
        logger.info("client round: repetition %s of %s: %.1fs", repeat + 1, repeats, timings[-1])
    return {
        "num_examples": len(examples),
        "steps": steps,
        "dp": float(cfg.privacy.dp),
        "round_s": statistics.median(timings),
    }


def format_aggregation(results: dict) -> str:
    """Format the aggregation timings, payload ratios and round share as Markdown."""
    lines = []
    # JSON turns the client counts into strings, so both spellings are accepted.
    timings = {
        rule: {int(count): seconds for count, seconds in by_count.items()}
        for rule, by_count in results.get("aggregation_s", {}).items()
    }
    if timings:
        rules = list(timings)
        counts = sorted({count for by_count in timings.values() for count in by_count})
        header = " | ".join(f"{rule} s | {rule} ms/N" for rule in rules)
        lines += [f"| N | {header} |", "|---|" + "---|" * (2 * len(rules))]
        for count in counts:
            cells = []
            for rule in rules:
                seconds = timings[rule][count]
                cells += [f"{seconds:.3f}", f"{seconds / count * 1e3:.2f}"]
            lines.append(f"| {count} | " + " | ".join(cells) + " |")
        lines.append("")

    payload = results.get("payload_ratios")
    if payload:
        lines += [
            "| setup | train-head | adapter bytes | base bytes | ratio |",
            "|---|---|---|---|---|",
        ]
        for row in payload:
            lines.append(
                f"| {row['setup']} | {'yes' if row['train_head'] else 'no'} | "
                f"{row['adapter_bytes']} | {row['base_bytes']} | {row['ratio']:.5f} |"
            )
        lines.append("")

    client = results.get("client_round")
    if client:
        lines.append(
            f"Largest client's local round: {client['round_s']:.2f} s "
            f"({client['num_examples']:.0f} examples, {client['steps']:.0f} steps, "
            f"DP {'on' if client['dp'] else 'off'})"
        )
        if timings:
            for rule, by_count in timings.items():
                if 20 not in by_count:
                    continue
                seconds = by_count[20]
                share = seconds / (seconds + client["round_s"])
                lines.append(
                    f"Aggregation share of a round, 20 clients, robust = {rule}: {share:.4f} "
                    f"({seconds:.3f} s / ({seconds:.3f} s + {client['round_s']:.2f} s))"
                )
    return "\n".join(lines)
