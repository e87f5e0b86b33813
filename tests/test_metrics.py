"""Tests for corpus BLEU, ROUGE-L and the E2E slot error rate."""

from __future__ import annotations

import math

import pytest
import sacrebleu

from common.metrics import (
    TextScores,
    corpus_bleu,
    rouge_l,
    score_generations,
    slot_error_rate,
    slot_errors,
)

EAGLE = "the eagle is a cheap coffee shop"


# ---------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------


def test_bleu_identical_text_is_100() -> None:
    text = "The Eagle is a cheap coffee shop near Burger King."
    assert corpus_bleu([text], [[text]]) == pytest.approx(100.0)


def test_bleu_multi_reference_by_hand() -> None:
    # Hypothesis (7 tokens) against two references, n-grams clipped by the max count
    # over references:
    #   1-grams: all 7 appear                               -> 7/7
    #   2-grams: "the eagle", "eagle is", "is a" (ref 1), "a cheap", "cheap coffee",
    #            "coffee shop" (ref 2)                      -> 6/6
    #   3-grams: "is a cheap" appears in neither            -> 4/5
    #   4-grams: "the eagle is a" (ref 1), "a cheap coffee shop" (ref 2) -> 2/4
    # Closest reference length is 7 (ref 2), so the brevity penalty is 1.
    references = [["the eagle is a coffee shop", "a cheap coffee shop is the eagle"]]
    expected = 100.0 * (1.0 * 1.0 * 0.8 * 0.5) ** 0.25

    assert corpus_bleu([EAGLE], references) == pytest.approx(expected)
    streams = [[refs[0] for refs in references], [refs[1] for refs in references]]
    assert sacrebleu.corpus_bleu([EAGLE], streams).score == pytest.approx(expected)


def test_bleu_unequal_reference_counts() -> None:
    hypotheses = [EAGLE, "cheap"]
    references = [
        ["the eagle coffee shop is cheap", "the eagle is cheap"],
        ["cheap food here"],
    ]
    score = corpus_bleu(hypotheses, references)

    # Repeating a reference changes neither the clipped n-gram counts nor the closest
    # reference length, so equal-length streams that repeat "cheap food here" must agree.
    repeated = [
        ["the eagle coffee shop is cheap", "cheap food here"],
        ["the eagle is cheap", "cheap food here"],
    ]
    assert score == pytest.approx(sacrebleu.corpus_bleu(hypotheses, repeated).score)

    # Padding with "" would be wrong: the 0-length reference is closest to the 1-token
    # hypothesis, which removes the brevity penalty and raises the score.
    padded_with_empty = [
        ["the eagle coffee shop is cheap", "cheap food here"],
        ["the eagle is cheap", ""],
    ]
    assert score < sacrebleu.corpus_bleu(hypotheses, padded_with_empty).score


def test_bleu_lowercase_default() -> None:
    hypothesis = "the eagle is a cheap coffee shop"
    reference = "The Eagle is a cheap Coffee Shop"
    assert corpus_bleu([hypothesis], [[reference]]) == pytest.approx(100.0)
    assert corpus_bleu([hypothesis], [[reference]], lowercase=False) < 100.0


def test_bleu_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"2 hypotheses but 1 reference"):
        corpus_bleu([EAGLE, EAGLE], [[EAGLE]])


def test_bleu_rejects_bad_references() -> None:
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        corpus_bleu([EAGLE, EAGLE], [[EAGLE], []])
    with pytest.raises(TypeError, match=r"references\[0\] is a str"):
        corpus_bleu([EAGLE], [EAGLE])
    with pytest.raises(ValueError, match="hypotheses is empty"):
        corpus_bleu([], [])


# ---------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------


def test_rouge_l_by_hand() -> None:
    # Hypothesis: the eagle is a cheap coffee shop      (7 tokens)
    # Reference:  the eagle coffee shop is cheap        (6 tokens)
    # LCS: "the eagle coffee shop" (or "the eagle is cheap"), 4 tokens.
    precision, recall = 4 / 7, 4 / 6
    f1 = 2 * precision * recall / (precision + recall)
    assert f1 == pytest.approx(8 / 13)

    # A worse second reference does not lower the score: the best reference counts.
    first = rouge_l([EAGLE], [["The Eagle coffee shop is cheap.", "Burger King"]])
    assert first == pytest.approx(100.0 * f1)

    # The corpus score is the mean over hypotheses.
    corpus = rouge_l(
        [EAGLE, "Cotto serves English food."],
        [["the eagle coffee shop is cheap"], ["cotto serves english food"]],
    )
    assert corpus == pytest.approx(100.0 * (f1 + 1.0) / 2)


def test_rouge_l_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"1 hypotheses but 2 reference"):
        rouge_l([EAGLE], [[EAGLE], [EAGLE]])


# ---------------------------------------------------------------------------
# Slot error rate
# ---------------------------------------------------------------------------

# (source attributes, generated text, expected missing attributes)
SLOT_CASES = [
    (
        {"name": "The Eagle", "eatType": "coffee shop", "priceRange": "cheap",
         "near": "Burger King"},
        "The Eagle is a cheap coffee shop near Burger King.",
        [],
    ),
    (
        {"name": "Fitzbillies", "familyFriendly": "yes", "area": "riverside",
         "food": "English"},
        "Fitzbillies is a kid-friendly place by the river serving British food.",
        [],
    ),
    (
        {"name": "Alimentum", "area": "city centre", "familyFriendly": "no"},
        "In the city center there is a venue named Alimentum that does not welcome children.",
        [],
    ),
    (
        {"name": "Cotto", "food": "Chinese", "priceRange": "£20-25", "area": "city centre"},
        "Cotto serves Chinese food for £20 - £25 in the centre of the city.",
        [],
    ),
    (
        {"name": "The Punter", "customer rating": "5 out of 5", "priceRange": "more than £30"},
        "The Punter is a five star venue with meals over £30.",
        [],
    ),
    (
        # "high" describes the price here, not the rating, and nothing mentions "under £20".
        {"name": "The Golden Palace", "customer rating": "high",
         "priceRange": "less than £20"},
        "The Golden Palace has a high price range.",
        ["customer rating", "priceRange"],
    ),
    (
        {"name": "Midsummer House", "customer rating": "low", "near": "The Bakers"},
        "Customers have rated Midsummer House low. It is near The Bakers.",
        [],
    ),
    (
        # The venue name is missing.
        {"name": "The Wrestlers", "eatType": "coffee shop", "food": "English",
         "near": "Raja Indian Cuisine"},
        "There is an English coffee shop near Raja Indian Cuisine.",
        ["name"],
    ),
    (
        # The landmark name is masked, so its "Indian" does not realise the food.
        {"name": "Cocum", "food": "Indian", "near": "Raja Indian Cuisine",
         "customer rating": "1 out of 5"},
        "Cocum, rated 1 out of 5, is next to Raja Indian Cuisine.",
        ["food"],
    ),
    (
        # Accents are ignored, and "Cafe" inside the masked landmark is no coffee shop.
        {"name": "The Punter", "eatType": "coffee shop", "near": "Café Sicilia"},
        "The Punter is next to Cafe Sicilia.",
        ["eatType"],
    ),
]


@pytest.mark.parametrize(("source", "text", "missing"), SLOT_CASES)
def test_slot_errors_e2e_cases(source: dict[str, str], text: str, missing: list[str]) -> None:
    assert slot_errors(source, text) == missing


def test_slot_errors_keep_source_order() -> None:
    source = {"near": "Burger King", "food": "French", "name": "The Eagle"}
    assert slot_errors(source, "A restaurant.") == ["near", "food", "name"]


def test_slot_error_rate_counts_values() -> None:
    sources = [case[0] for case in SLOT_CASES]
    texts = [case[1] for case in SLOT_CASES]
    num_values = sum(len(source) for source in sources)
    num_missing = sum(len(case[2]) for case in SLOT_CASES)
    assert num_missing == 5
    assert slot_error_rate(sources, texts) == pytest.approx(num_missing / num_values)


def test_slot_error_rate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="1 sources but 2 hypotheses"):
        slot_error_rate([{"name": "Cotto"}], ["Cotto", "Cotto"])
    with pytest.raises(ValueError, match="no attribute values"):
        slot_error_rate([{}], ["Cotto"])
    with pytest.raises(ValueError, match="'food' has value ''"):
        slot_errors({"name": "Cotto", "food": ""}, "Cotto")
    with pytest.raises(TypeError, match="expected a mapping"):
        slot_error_rate(["name[Cotto], food[English]"], ["Cotto"])  # type: ignore[list-item]


# ---------------------------------------------------------------------------
# All scores
# ---------------------------------------------------------------------------


def test_score_generations_combines_metrics() -> None:
    sources = [{"name": "The Eagle", "eatType": "coffee shop", "priceRange": "cheap"},
               {"name": "Cotto", "food": "English"}]
    hypotheses = ["the eagle is a cheap coffee shop", "cotto is near the river"]
    references = [["The Eagle is a cheap coffee shop."],
                  ["Cotto serves English food.", "Cotto has English food."]]

    scores = score_generations(sources, hypotheses, references)

    assert isinstance(scores, TextScores)
    assert scores.num_sources == 2
    assert scores.slot_error_rate == pytest.approx(1 / 5)
    assert scores.bleu == pytest.approx(corpus_bleu(hypotheses, references))
    assert scores.rouge_l == pytest.approx(rouge_l(hypotheses, references))
    assert 0.0 < scores.bleu < 100.0
    assert not math.isnan(scores.rouge_l)
