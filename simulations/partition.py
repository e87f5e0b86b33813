"""Partitioners that split AdRecords into simulated clients, and the held-out test split."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

from common.data import AdRecord

logger = logging.getLogger(__name__)

DEFAULT_MAX_DIRICHLET_TRIES = 100


@dataclass(frozen=True)
class Partitioning(Sequence[tuple[AdRecord, ...]]):
    """Records split into partitions (one per simulated client), with a key per partition.

    It behaves as a read-only sequence of partitions: ``len(p)``, ``p[i]`` and iteration
    work as on a ``list[list[AdRecord]]``, and the index of a partition is its client
    index. ``keys[i]`` names partition ``i``: the column value for ``partition_by_column``,
    and ``str(i)`` for the random partitioners.
    """

    keys: tuple[str, ...]
    partitions: tuple[tuple[AdRecord, ...], ...]

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.partitions):
            raise ValueError(
                f"Partitioning has {len(self.keys)} keys but {len(self.partitions)} partitions. "
                "Pass one key per partition"
            )

    def __len__(self) -> int:
        return len(self.partitions)

    @overload
    def __getitem__(self, index: int) -> tuple[AdRecord, ...]: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[tuple[AdRecord, ...], ...]: ...

    def __getitem__(
        self, index: int | slice
    ) -> tuple[AdRecord, ...] | tuple[tuple[AdRecord, ...], ...]:
        return self.partitions[index]

    def __iter__(self) -> Iterator[tuple[AdRecord, ...]]:
        return iter(self.partitions)

    @property
    def sizes(self) -> list[int]:
        """Number of records in each partition."""
        return [len(partition) for partition in self.partitions]


def _from_index_lists(records: Sequence[AdRecord], index_lists: list[np.ndarray]) -> Partitioning:
    # Records keep their input order inside a partition, so a partition lists rows in file order.
    partitions = tuple(tuple(records[i] for i in np.sort(indices)) for indices in index_lists)
    return Partitioning(keys=tuple(str(i) for i in range(len(partitions))), partitions=partitions)


def check_partitions(
    partitions: Partitioning | Sequence[Sequence[AdRecord]],
    *,
    min_size: int = 1,
    advice: str = "Use fewer partitions, or a larger alpha for a Dirichlet split",
) -> None:
    """Raise ValueError if a partition has fewer than ``min_size`` records.

    The message names the first such partition by index and key (when ``partitions`` is a
    Partitioning), and ends with ``advice``, the change that would avoid it.
    """
    keys = partitions.keys if isinstance(partitions, Partitioning) else None
    for index, partition in enumerate(partitions):
        if len(partition) >= min_size:
            continue
        key = f" (key {keys[index]!r})" if keys is not None else ""
        size_description = "is empty" if not partition else f"has {len(partition)} records"
        raise ValueError(
            f"partition {index}{key} {size_description}, below the minimum of {min_size} "
            f"records per partition. {advice}"
        )


def _field_value(record: AdRecord, column: str) -> str:
    if column not in record.fields:
        raise ValueError(
            f"record at {record.origin or '<unknown origin>'} has no column {column!r} "
            f"(columns: {sorted(record.fields)}). Choose a column that every record has"
        )
    return record.fields[column]


def partition_by_column(records: Sequence[AdRecord], column: str) -> Partitioning:
    """Split records into one partition per distinct value of ``fields[column]``.

    Partitions are ordered by sorted value, so a partition index refers to the same value
    across runs, and ``keys`` contains the values. For E2E, ``column="name"`` gives one
    partition per venue, which acts as one advertiser.

    Raises
    ------
    ValueError
        If ``records`` is empty or a record lacks ``column`` (the message names its origin).
    """
    if not records:
        raise ValueError("partition_by_column: records is empty. Load at least one record")
    groups: dict[str, list[AdRecord]] = {}
    for record in records:
        groups.setdefault(_field_value(record, column), []).append(record)
    keys = tuple(sorted(groups))
    logger.info("partition_by_column: %s partitions by column %r", len(keys), column)
    return Partitioning(keys=keys, partitions=tuple(tuple(groups[key]) for key in keys))


def _check_num_partitions(records: Sequence[AdRecord], num_partitions: int) -> None:
    if num_partitions < 1:
        raise ValueError(f"num_partitions={num_partitions} must be at least 1")
    if num_partitions > len(records):
        raise ValueError(
            f"num_partitions={num_partitions} exceeds the {len(records)} records, so some "
            "partitions would be empty. Use fewer partitions or more records"
        )


def partition_iid(records: Sequence[AdRecord], num_partitions: int, *, seed: int) -> Partitioning:
    """Split records uniformly at random into ``num_partitions`` partitions.

    Partition sizes differ by at most one. The same records and seed give the same
    partitions.
    """
    _check_num_partitions(records, num_partitions)
    rng = np.random.default_rng(seed)
    index_lists = np.array_split(rng.permutation(len(records)), num_partitions)
    partitioning = _from_index_lists(records, index_lists)
    check_partitions(partitioning, advice="Use fewer partitions")
    return partitioning


def partition_dirichlet(
    records: Sequence[AdRecord],
    num_partitions: int,
    *,
    alpha: float,
    label_column: str,
    seed: int,
    min_partition_size: int = 1,
    max_tries: int = DEFAULT_MAX_DIRICHLET_TRIES,
) -> Partitioning:
    """Split records with label skew drawn from a symmetric Dirichlet distribution.

    For each distinct value (label) of ``fields[label_column]``, the shares of that
    label's records across partitions are drawn from Dir(alpha, ..., alpha), and the
    label's shuffled records are cut at those shares, so every record is used exactly once.
    Hsu, Qi and Brown (2019, arXiv:1909.06335) introduced Dirichlet label skew by drawing
    each client's label mix. The per-label draw used here is the form of Flower Datasets'
    ``DirichletPartitioner`` (after Yurochkin et al., 2019). A small alpha (0.1) gives
    each partition few labels, while a large alpha (100) approaches an IID split.

    Parameters
    ----------
    records : sequence of AdRecord
        Records to split. Every record must have ``label_column``.
    num_partitions : int
        Number of partitions.
    alpha : float
        Dirichlet concentration, > 0.
    label_column : str
        Field whose values are the labels.
    seed : int
        Seed of the random generator. The same inputs and seed give the same partitions.
    min_partition_size : int, default 1
        Minimum number of records per partition. A draw that leaves a smaller partition is
        rejected and drawn again.
    max_tries : int, default 100
        Number of draws before giving up.

    Raises
    ------
    ValueError
        If an argument is out of range, a record lacks ``label_column``, or no draw within
        ``max_tries`` meets ``min_partition_size``.
    """
    _check_num_partitions(records, num_partitions)
    if not alpha > 0:
        raise ValueError(f"alpha={alpha} must be > 0. Typical values are 0.1 to 100")
    if min_partition_size < 0:
        raise ValueError(f"min_partition_size={min_partition_size} must be >= 0")
    if min_partition_size * num_partitions > len(records):
        raise ValueError(
            f"min_partition_size={min_partition_size} times num_partitions={num_partitions} "
            f"exceeds the {len(records)} records. Lower either of them"
        )
    if max_tries < 1:
        raise ValueError(f"max_tries={max_tries} must be at least 1")

    labels = np.array([_field_value(record, label_column) for record in records])
    label_values = np.unique(labels)  # Sorted, so the draws do not depend on record order.
    rng = np.random.default_rng(seed)

    smallest_size = 0
    for attempt in range(1, max_tries + 1):
        index_lists: list[list[int]] = [[] for _ in range(num_partitions)]
        for label in label_values:
            label_indices = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            # Cut points are the cumulative shares scaled to the label's record count.
            cuts = (np.cumsum(shares)[:-1] * len(label_indices)).astype(int)
            for partition_index, chunk in enumerate(np.split(label_indices, cuts)):
                index_lists[partition_index].extend(chunk.tolist())
        smallest_size = min(len(indices) for indices in index_lists)
        if smallest_size >= min_partition_size:
            logger.info(
                "partition_dirichlet: %s partitions, alpha=%s, accepted draw %s of %s",
                num_partitions,
                alpha,
                attempt,
                max_tries,
            )
            return _from_index_lists(records, [np.array(i, dtype=int) for i in index_lists])

    raise ValueError(
        f"partition_dirichlet: none of {max_tries} draws gave every partition at least "
        f"min_partition_size={min_partition_size} records (the last draw's smallest partition "
        f"had {smallest_size}). Use fewer partitions, a larger alpha (now {alpha}), a smaller "
        "min_partition_size or a larger max_tries"
    )


def split_heldout_by_source(
    records: Sequence[AdRecord], *, test_fraction: float, seed: int
) -> tuple[list[AdRecord], list[AdRecord]]:
    """Split records into (train, test) by distinct ``source``, so no source is in both.

    All references of one source (one E2E MR) go to the same side, because a source seen
    in training would inflate the test scores. ``round(test_fraction * num_sources)``
    sources, at least one and at most all but one, go to the test side. The fraction of
    records therefore only approximates ``test_fraction``. The split depends only on the
    set of sources and the seed, not on record order, and both sides keep record order.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must be between 0 and 1 (exclusive)")
    sources = sorted({record.source for record in records})
    if len(sources) < 2:
        raise ValueError(
            f"split_heldout_by_source needs at least 2 distinct sources, found {len(sources)}. "
            "Load more records"
        )
    num_test = min(max(round(test_fraction * len(sources)), 1), len(sources) - 1)
    rng = np.random.default_rng(seed)
    test_sources = {sources[i] for i in rng.permutation(len(sources))[:num_test]}

    train = [record for record in records if record.source not in test_sources]
    test = [record for record in records if record.source in test_sources]
    logger.info(
        "split_heldout_by_source: %s of %s sources held out (%s train, %s test records)",
        num_test,
        len(sources),
        len(train),
        len(test),
    )
    return train, test


def group_references(records: Sequence[AdRecord]) -> list[tuple[str, list[str]]]:
    """Group texts by source for multi-reference evaluation, in first-seen source order."""
    groups: dict[str, list[str]] = {}
    for record in records:
        groups.setdefault(record.source, []).append(record.text)
    return list(groups.items())


def limit_examples(
    partition: Sequence[AdRecord], max_examples: int | None, *, seed: int
) -> list[AdRecord]:
    """Return at most ``max_examples`` records of a partition, drawn without replacement.

    A partition within the limit, or ``max_examples=None``, is returned whole. A sample
    keeps the partition's record order, and the same seed draws the same sample.
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples={max_examples} must be at least 1 or None")
    if max_examples is None or len(partition) <= max_examples:
        return list(partition)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(partition), size=max_examples, replace=False))
    return [partition[i] for i in chosen]
