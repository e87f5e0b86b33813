"""Tests for the partitioners and the held-out split, on the real E2E development set."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from common.data import AdRecord
from common.e2e import load_e2e
from simulations.partition import (
    Partitioning,
    check_partitions,
    group_references,
    limit_examples,
    partition_by_column,
    partition_dirichlet,
    partition_iid,
    split_heldout_by_source,
)


@pytest.fixture(scope="module")
def devset(data_dir: Path) -> list[AdRecord]:
    return load_e2e(data_dir / "e2e" / "devset.csv")


def _origins(partitions: Sequence[Sequence[AdRecord]]) -> list[str]:
    return [record.origin for partition in partitions for record in partition]


def _mean_label_distance(partitions: Partitioning, column: str) -> float:
    """Mean total-variation distance between each partition's and the global label mix."""
    overall = Counter(record.fields[column] for partition in partitions for record in partition)
    total = sum(overall.values())
    distances = []
    for partition in partitions:
        counts = Counter(record.fields[column] for record in partition)
        distance = 0.5 * sum(
            abs(counts[label] / len(partition) - overall[label] / total) for label in overall
        )
        distances.append(distance)
    return sum(distances) / len(distances)


# --- by column ------------------------------------------------------------------------------


def test_venue_partition_sizes(devset: list[AdRecord]) -> None:
    partitioning = partition_by_column(devset, "name")

    assert len(partitioning) == 20
    assert min(partitioning.sizes) == 18
    assert max(partitioning.sizes) == 679
    assert sum(partitioning.sizes) == 4672
    assert list(partitioning.keys) == sorted(partitioning.keys)
    assert partitioning.keys[partitioning.sizes.index(679)] == "The Eagle"


def test_venue_partition_members(devset: list[AdRecord]) -> None:
    partitioning = partition_by_column(devset, "name")

    for key, partition in zip(partitioning.keys, partitioning):
        assert {record.fields["name"] for record in partition} == {key}
    assert sorted(_origins(partitioning)) == sorted(record.origin for record in devset)


def test_venue_partition_independent_of_order(devset: list[AdRecord]) -> None:
    shuffled = list(devset)
    random.Random(3).shuffle(shuffled)

    original = partition_by_column(devset, "name")
    reordered = partition_by_column(shuffled, "name")

    assert reordered.keys == original.keys
    assert reordered.sizes == original.sizes


def test_partition_by_missing_column(devset: list[AdRecord]) -> None:
    # Not every E2E MR has a food attribute.
    without_food = next(record for record in devset if "food" not in record.fields)

    with pytest.raises(ValueError) as info:
        partition_by_column(devset, "food")

    assert without_food.origin in str(info.value)
    assert "'food'" in str(info.value)


# --- IID ------------------------------------------------------------------------------------


def test_iid_sizes_and_cover(devset: list[AdRecord]) -> None:
    partitioning = partition_iid(devset, 7, seed=0)

    assert len(partitioning) == 7
    assert max(partitioning.sizes) - min(partitioning.sizes) <= 1
    assert sum(partitioning.sizes) == 4672
    assert sorted(_origins(partitioning)) == sorted(record.origin for record in devset)
    assert partitioning.keys == tuple(str(i) for i in range(7))


def test_iid_deterministic(devset: list[AdRecord]) -> None:
    first = partition_iid(devset, 5, seed=11)
    second = partition_iid(devset, 5, seed=11)
    other = partition_iid(devset, 5, seed=12)

    assert _origins(first) == _origins(second)
    assert _origins(first) != _origins(other)


def test_iid_too_many_partitions(devset: list[AdRecord]) -> None:
    with pytest.raises(ValueError, match="num_partitions=11 exceeds the 10 records"):
        partition_iid(devset[:10], 11, seed=0)


# --- Dirichlet ------------------------------------------------------------------------------


def test_dirichlet_sizes_and_cover(devset: list[AdRecord]) -> None:
    partitioning = partition_dirichlet(
        devset, 10, alpha=0.5, label_column="name", seed=0, min_partition_size=20
    )

    assert len(partitioning) == 10
    assert min(partitioning.sizes) >= 20
    assert sum(partitioning.sizes) == 4672
    assert sorted(_origins(partitioning)) == sorted(record.origin for record in devset)


def test_dirichlet_deterministic(devset: list[AdRecord]) -> None:
    first = partition_dirichlet(devset, 8, alpha=0.3, label_column="name", seed=5)
    second = partition_dirichlet(devset, 8, alpha=0.3, label_column="name", seed=5)
    other = partition_dirichlet(devset, 8, alpha=0.3, label_column="name", seed=6)

    assert _origins(first) == _origins(second)
    assert first.sizes != other.sizes


def test_dirichlet_skew_follows_alpha(devset: list[AdRecord]) -> None:
    skewed = partition_dirichlet(devset, 10, alpha=0.1, label_column="name", seed=0)
    near_iid = partition_dirichlet(devset, 10, alpha=100.0, label_column="name", seed=0)

    assert _mean_label_distance(skewed, "name") > 0.5
    assert _mean_label_distance(near_iid, "name") < 0.1


def test_dirichlet_unreachable_min_size(devset: list[AdRecord]) -> None:
    with pytest.raises(ValueError) as info:
        partition_dirichlet(
            devset,
            50,
            alpha=0.01,
            label_column="name",
            seed=0,
            min_partition_size=50,
            max_tries=3,
        )

    assert "none of 3 draws" in str(info.value)
    assert "min_partition_size=50" in str(info.value)
    assert "larger alpha" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.0}, "alpha=0.0 must be > 0"),
        ({"min_partition_size": 500}, "min_partition_size=500 times num_partitions=10"),
        ({"max_tries": 0}, "max_tries=0"),
    ],
)
def test_dirichlet_invalid_arguments(
    devset: list[AdRecord], kwargs: dict[str, float], message: str
) -> None:
    arguments = {"alpha": 1.0, "label_column": "name", "seed": 0, **kwargs}

    with pytest.raises(ValueError, match=message):
        partition_dirichlet(devset, 10, **arguments)  # type: ignore[arg-type]


# --- empty partitions -----------------------------------------------------------------------


def test_check_partitions_names_empty_key(devset: list[AdRecord]) -> None:
    partitioning = Partitioning(keys=("Alimentum", "Aromi"), partitions=(tuple(devset[:3]), ()))

    with pytest.raises(ValueError) as info:
        check_partitions(partitioning)

    assert "partition 1 (key 'Aromi') is empty" in str(info.value)
    assert "fewer partitions" in str(info.value)


def test_check_partitions_min_size_on_lists(devset: list[AdRecord]) -> None:
    check_partitions([devset[:3], devset[3:5]], min_size=2)

    with pytest.raises(ValueError, match="partition 1 has 2 records, below the minimum of 3"):
        check_partitions([devset[:3], devset[3:5]], min_size=3)


# --- held-out split -------------------------------------------------------------------------


def test_heldout_no_source_on_both_sides(devset: list[AdRecord]) -> None:
    train, test = split_heldout_by_source(devset, test_fraction=0.2, seed=0)

    train_sources = {record.source for record in train}
    test_sources = {record.source for record in test}
    assert train_sources.isdisjoint(test_sources)
    assert len(train) + len(test) == 4672
    assert len(test_sources) == round(0.2 * 547)
    assert 0.15 < len(test) / 4672 < 0.25


def test_heldout_deterministic(devset: list[AdRecord]) -> None:
    first = split_heldout_by_source(devset, test_fraction=0.1, seed=1)
    second = split_heldout_by_source(list(reversed(devset)), test_fraction=0.1, seed=1)
    other = split_heldout_by_source(devset, test_fraction=0.1, seed=2)

    assert {r.origin for r in first[1]} == {r.origin for r in second[1]}
    assert {r.origin for r in first[1]} != {r.origin for r in other[1]}


def test_heldout_keeps_record_order(devset: list[AdRecord]) -> None:
    train, test = split_heldout_by_source(devset, test_fraction=0.1, seed=0)
    position = {record.origin: index for index, record in enumerate(devset)}

    assert [position[r.origin] for r in train] == sorted(position[r.origin] for r in train)
    assert [position[r.origin] for r in test] == sorted(position[r.origin] for r in test)


@pytest.mark.parametrize("test_fraction", [0.0, 1.0, -0.1])
def test_heldout_invalid_fraction(devset: list[AdRecord], test_fraction: float) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        split_heldout_by_source(devset, test_fraction=test_fraction, seed=0)


def test_heldout_single_source(devset: list[AdRecord]) -> None:
    one_source = [record for record in devset if record.source == devset[0].source]

    with pytest.raises(ValueError, match="at least 2 distinct sources, found 1"):
        split_heldout_by_source(one_source, test_fraction=0.5, seed=0)


def test_group_references(devset: list[AdRecord]) -> None:
    groups = group_references(devset)

    assert len(groups) == 547
    assert sum(len(texts) for _, texts in groups) == 4672
    assert groups[0][0] == devset[0].source
    assert groups[0][1] == [r.text for r in devset if r.source == devset[0].source]
    first_seen = list(dict.fromkeys(record.source for record in devset))
    assert [source for source, _ in groups] == first_seen


# --- limit_examples -------------------------------------------------------------------------


def test_limit_examples_caps_and_keeps_order(devset: list[AdRecord]) -> None:
    partition = partition_by_column(devset, "name")[0]

    limited = limit_examples(partition, 50, seed=0)

    assert len(limited) == 50
    assert len({record.origin for record in limited}) == 50
    positions = [partition.index(record) for record in limited]
    assert positions == sorted(positions)
    assert limited == limit_examples(partition, 50, seed=0)
    assert limited != limit_examples(partition, 50, seed=1)


def test_limit_examples_no_cap(devset: list[AdRecord]) -> None:
    assert limit_examples(devset[:10], 20, seed=0) == devset[:10]
    assert limit_examples(devset[:10], None, seed=0) == devset[:10]
    with pytest.raises(ValueError, match="max_examples=0"):
        limit_examples(devset[:10], 0, seed=0)
