"""Per-process caches of what a ClientApp needs: identity, encoded records and the model.

Flower calls the ClientApp once per round, often in a long-lived worker process; loading
the base model and tokenizing the records once per process keeps rounds fast. Records are
scrubbed of PII (``client.pii``) before they are tokenized, so the model never sees the
replaced values. The replacement counts are logged here, on the client, and leave it only
when ``privacy.report-pii-counts`` is true, because an exact count is a statistic of the
private records that the DP guarantee does not cover.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

from flwr.app import Context
from peft import PeftModel

from client.pii import KINDS, ScrubConfig, scrub_records
from common import secure_rng
from common.config import PRV_MAX_EPSILON, DataConfig, ModelConfig, PrivacyConfig, RunConfig
from common.data import AdRecord, load_records
from common.model import build_lora_model, load_tokenizer
from common.text import EncodedExample, encode_records

logger = logging.getLogger(__name__)

PII_REPLACED_METRIC = "pii-replaced"


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


def scrub_config(kinds: frozenset[str]) -> ScrubConfig:
    """Scrubbing detectors for the PII ``kinds`` (names from ``client.pii.KINDS``)."""
    unknown = sorted(kinds - set(KINDS))
    if unknown:
        raise ValueError(f"unknown PII kinds {unknown}: expected a subset of {', '.join(KINDS)}")
    return ScrubConfig(
        emails="email" in kinds,
        phones="phone" in kinds,
        payment_cards="card" in kinds,
        user_urls="url" in kinds,
    )


@functools.lru_cache(maxsize=1)
def _warn_scrubbing_off() -> None:
    logger.warning(
        "load_client_examples: privacy.scrub-pii is off: emails, phone numbers, card "
        "numbers and user URLs in the records reach the model unchanged"
    )


def _encode(
    model_cfg: ModelConfig, records: Sequence[AdRecord], kinds: frozenset[str]
) -> tuple[tuple[EncodedExample, ...], int, dict[str, int]]:
    """Scrub ``records`` of the PII ``kinds``, then tokenize them."""
    counts: dict[str, int] = {}
    if kinds:
        records, counts = scrub_records(records, scrub_config(kinds))
    else:
        _warn_scrubbing_off()
    tokenizer = load_tokenizer(model_cfg.name)
    examples = encode_records(tokenizer, records, max_length=model_cfg.max_length)
    return tuple(examples), int(tokenizer.pad_token_id or 0), counts


@functools.lru_cache(maxsize=8)
def _encoded_partition(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    seed: int,
    partition_id: int,
    kinds: frozenset[str],
) -> tuple[tuple[EncodedExample, ...], int, dict[str, int]]:
    from simulations.dataset import federated_data

    data = federated_data(data_cfg, seed)
    if not 0 <= partition_id < data.num_clients:
        raise ValueError(
            f"partition-id {partition_id} is out of range for {data.num_clients} clients: "
            "start the simulation with --num-clients equal to the number of partitions"
        )
    return _encode(model_cfg, data.partitions[partition_id], kinds)


@functools.lru_cache(maxsize=8)
def _encoded_file(
    model_cfg: ModelConfig, data_cfg: DataConfig, path: str, kinds: frozenset[str]
) -> tuple[tuple[EncodedExample, ...], int, dict[str, int]]:
    records = load_records(
        Path(path),
        source_column=data_cfg.source_column,
        text_column=data_cfg.text_column,
        max_chars=data_cfg.max_chars,
    )
    return _encode(model_cfg, records, kinds)


def _encoded_client_data(
    cfg: RunConfig, context: Context
) -> tuple[tuple[EncodedExample, ...], int, dict[str, int]]:
    node_config = context.node_config
    kinds = cfg.privacy.scrub_kind_set
    if "data-path" in node_config:
        return _encoded_file(cfg.model, cfg.data, str(node_config["data-path"]), kinds)
    return _encoded_partition(
        cfg.model, cfg.data, cfg.seed, int(node_config["partition-id"]), kinds
    )


def load_client_examples(cfg: RunConfig, context: Context) -> tuple[list[EncodedExample], int]:
    """Encoded training records of this client, scrubbed of PII, and the pad token id.

    A deployed SuperNode names its own file with ``data-path`` in its node config; in a
    simulation the node's ``partition-id`` selects a partition of the configured dataset.
    ``privacy.scrub-pii`` and ``privacy.scrub-kinds`` select the PII kinds replaced before
    tokenization.
    """
    examples, pad, _ = _encoded_client_data(cfg, context)
    return list(examples), pad


def pii_metrics(cfg: RunConfig, context: Context) -> dict[str, int]:
    """Train-reply metrics about PII scrubbing: the total replacements, or nothing.

    The total is sent only when ``privacy.report-pii-counts`` is true. Counts per kind
    never leave the client.
    """
    if not cfg.privacy.report_pii_counts:
        return {}
    _, _, counts = _encoded_client_data(cfg, context)
    return {PII_REPLACED_METRIC: sum(counts.get(kind, 0) for kind in KINDS)}


@functools.lru_cache(maxsize=4)
def ledger_accountant(privacy: PrivacyConfig) -> str:
    """Accountant for a new ledger: ``privacy.accountant``, or RDP for PRV at high ε.

    Logs a WARNING (once per process and config) when PRV is replaced. A ledger that
    already exists keeps the accountant it was written with (see ``PrivacyLedger.open``).
    """
    in_use = privacy.accountant_in_use
    if in_use != privacy.accountant:
        logger.warning(
            "train: privacy.accountant = %s is inaccurate above epsilon %s, and "
            "privacy.target-epsilon = %s: composing epsilon with %s instead",
            privacy.accountant,
            PRV_MAX_EPSILON,
            privacy.target_epsilon,
            in_use,
        )
    return in_use


def check_secure_mode(privacy: PrivacyConfig) -> None:
    """Raise RuntimeError if ``privacy.secure_mode`` is on but ``os.urandom`` fails.

    Secure mode draws DP noise and Poisson samples from the operating system's CSPRNG
    (``common.secure_rng``). ``os.urandom`` raises NotImplementedError where the system has
    no such source, so this check turns a round of failed replies into one clear error
    before the run starts.
    """
    if not privacy.secure_mode:
        return  # checked whatever the DP unit: advertiser-level noise uses it too
    cause = "privacy.production = true" if privacy.production else "privacy.secure-mode = true"
    try:
        secure_rng.uniform(1)
    except NotImplementedError as err:
        raise RuntimeError(
            f"{cause} needs the operating system's cryptographically secure random "
            f"generator, and os.urandom failed: {err}. Run on a system that provides "
            "getrandom(2) or /dev/urandom, or for experiments set privacy.production = false "
            "and privacy.secure-mode = false (noise then comes from a seeded generator)"
        ) from err
    logger.info(
        "secure mode (%s): DP noise and Poisson sampling come from os.urandom", cause
    )
