"""Per-process caches of what a ClientApp needs: identity, encoded records and the model.

Flower calls the ClientApp once per round, often in a long-lived worker process; loading
the base model and tokenizing the records once per process keeps rounds fast.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from flwr.app import Context
from peft import PeftModel

from common.config import DataConfig, ModelConfig, RunConfig
from common.data import load_records
from common.model import build_lora_model, load_tokenizer
from common.text import EncodedExample, encode_records

logger = logging.getLogger(__name__)


def client_identity(context: Context) -> str:
    """Stable client id: ``client-id`` from the node config, else ``client-<partition-id>``."""
    node_config = context.node_config
    if "client-id" in node_config:
        return str(node_config["client-id"])
    if "partition-id" in node_config:
        return f"client-{int(node_config['partition-id']):03d}"
    raise ValueError(
        "node config has neither client-id nor partition-id: start the SuperNode with "
        "--node-config \"client-id='NAME' data-path='FILE'\""
    )


@functools.lru_cache(maxsize=2)
def load_model(cfg: RunConfig) -> PeftModel:
    """Base model with a LoRA adapter; its tensors are overwritten by every train message."""
    return build_lora_model(cfg.model, seed=cfg.seed)


@functools.lru_cache(maxsize=8)
def _encoded_partition(
    model_cfg: ModelConfig, data_cfg: DataConfig, seed: int, partition_id: int
) -> tuple[tuple[EncodedExample, ...], int]:
    from simulations.dataset import federated_data

    data = federated_data(data_cfg, seed)
    if not 0 <= partition_id < data.num_clients:
        raise ValueError(
            f"partition-id {partition_id} is out of range for {data.num_clients} clients: "
            "start the simulation with --num-clients equal to the number of partitions"
        )
    tokenizer = load_tokenizer(model_cfg.name)
    examples = encode_records(
        tokenizer, data.partitions[partition_id], max_length=model_cfg.max_length
    )
    return tuple(examples), int(tokenizer.pad_token_id or 0)


@functools.lru_cache(maxsize=8)
def _encoded_file(
    model_cfg: ModelConfig, data_cfg: DataConfig, path: str
) -> tuple[tuple[EncodedExample, ...], int]:
    records = load_records(
        Path(path),
        source_column=data_cfg.source_column,
        text_column=data_cfg.text_column,
        max_chars=data_cfg.max_chars,
    )
    tokenizer = load_tokenizer(model_cfg.name)
    examples = encode_records(tokenizer, records, max_length=model_cfg.max_length)
    return tuple(examples), int(tokenizer.pad_token_id or 0)


def load_client_examples(cfg: RunConfig, context: Context) -> tuple[list[EncodedExample], int]:
    """Encoded training records of this client and the pad token id.

    A deployed SuperNode names its own file with ``data-path`` in its node config; in a
    simulation the node's ``partition-id`` selects a partition of the configured dataset.
    """
    node_config = context.node_config
    if "data-path" in node_config:
        examples, pad = _encoded_file(cfg.model, cfg.data, str(node_config["data-path"]))
    else:
        examples, pad = _encoded_partition(
            cfg.model, cfg.data, cfg.seed, int(node_config["partition-id"])
        )
    return list(examples), pad
