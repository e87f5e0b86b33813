"""Federated view of a dataset: per-client training partitions and a held-out test split."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from common.config import DataConfig
from common.data import AdRecord, load_records
from common.e2e import ensure_e2e_file, load_e2e
from simulations.partition import (
    Partitioning,
    check_partitions,
    limit_examples,
    partition_by_column,
    partition_dirichlet,
    partition_iid,
    split_heldout_by_source,
)

logger = logging.getLogger(__name__)


CANARY_ORIGIN = "canary"


@dataclass(frozen=True)
class FederatedData:
    """Client partitions of the training records and the test records held out by source.

    ``canary`` is the planted record (its source and secret text) when the config plants
    one, else None.
    """

    partitions: Partitioning
    test: tuple[AdRecord, ...]
    canary: AdRecord | None = None

    @property
    def num_clients(self) -> int:
        return len(self.partitions)


def load_dataset(cfg: DataConfig) -> list[AdRecord]:
    """Read all records of the configured dataset (E2E files are downloaded when missing)."""
    if cfg.dataset == "e2e":
        path = ensure_e2e_file(Path(cfg.data_dir), cfg.train_file)
        return load_e2e(path, max_chars=cfg.max_chars)
    path = Path(cfg.train_file)
    if not path.is_absolute():
        path = Path(cfg.data_dir) / path
    return load_records(
        path,
        source_column=cfg.source_column,
        text_column=cfg.text_column,
        max_chars=cfg.max_chars,
    )


@functools.lru_cache(maxsize=4)
def federated_data(cfg: DataConfig, seed: int) -> FederatedData:
    """Split the dataset into a held-out test set and ``cfg.num_clients`` partitions.

    With the column partitioner every distinct value is one client, in sorted order; a
    smaller ``num-clients`` keeps the first clients in that order. The result is cached per
    process, because Flower calls the ClientApp once per round.
    """
    records = load_dataset(cfg)
    train, test = split_heldout_by_source(records, test_fraction=cfg.test_fraction, seed=seed)
    if cfg.partitioner == "column":
        partitions = partition_by_column(train, cfg.partition_column)
        if cfg.num_clients > len(partitions):
            raise ValueError(
                f"data.num-clients = {cfg.num_clients}, but column {cfg.partition_column!r} "
                f"has only {len(partitions)} distinct values: lower --num-clients or use the "
                "iid or dirichlet partitioner"
            )
        if cfg.num_clients < len(partitions):
            logger.info(
                "federated_data: keeping the first %s of %s %r partitions",
                cfg.num_clients,
                len(partitions),
                cfg.partition_column,
            )
            partitions = Partitioning(
                partitions.keys[: cfg.num_clients], partitions.partitions[: cfg.num_clients]
            )
    elif cfg.partitioner == "iid":
        partitions = partition_iid(train, cfg.num_clients, seed=seed)
    else:
        partitions = partition_dirichlet(
            train,
            cfg.num_clients,
            alpha=cfg.dirichlet_alpha,
            label_column=cfg.partition_column,
            seed=seed,
        )
    if cfg.max_examples_per_client:
        partitions = Partitioning(
            partitions.keys,
            tuple(
                tuple(limit_examples(p, cfg.max_examples_per_client, seed=seed + i))
                for i, p in enumerate(partitions)
            ),
        )
    check_partitions(partitions)
    canary = None
    if cfg.canary_repeats:
        partitions, canary = plant_canary(
            partitions,
            client=cfg.canary_client,
            secret=cfg.canary_secret,
            repeats=cfg.canary_repeats,
        )
    return FederatedData(partitions=partitions, test=tuple(test), canary=canary)


def plant_canary(
    partitions: Partitioning, *, client: int, secret: str, repeats: int
) -> tuple[Partitioning, AdRecord]:
    """Append ``repeats`` copies of a canary record to partition ``client``.

    The canary's source is the source of that partition's first record, so the secret
    appears in a context the advertiser's own data uses, and its text is ``secret``. This
    is the insertion step of the exposure test of Carlini et al. (2019), "The Secret
    Sharer". The copies go after the partition's records; DP-SGD samples records by
    Poisson sampling and plain training shuffles them, so the position does not matter.
    """
    if not 0 <= client < len(partitions):
        raise ValueError(
            f"data.canary-client = {client} is out of range for {len(partitions)} clients: "
            f"pick a partition index from 0 to {len(partitions) - 1}"
        )
    canary = AdRecord(source=partitions[client][0].source, text=secret, origin=CANARY_ORIGIN)
    planted = tuple(
        (*records, *([canary] * repeats)) if index == client else records
        for index, records in enumerate(partitions)
    )
    logger.info(
        "federated_data: planted a canary %s times in partition %s (%r)",
        repeats,
        client,
        partitions.keys[client],
    )
    return Partitioning(partitions.keys, planted), canary
