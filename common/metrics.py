"""Text-generation metrics for ad copy: corpus BLEU, ROUGE-L and slot error rate."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rouge_score.rouge_scorer import RougeScorer  # type: ignore[import-untyped]
from sacrebleu.metrics import BLEU

__all__ = [
    "TextScores",
    "corpus_bleu",
    "rouge_l",
    "score_generations",
    "slot_error_rate",
    "slot_errors",
]


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def _check_corpus(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]]
) -> None:
    """Raise unless there is one non-empty list of reference strings per hypothesis."""
    if len(hypotheses) != len(references):
        raise ValueError(
            f"hypotheses and references differ in length: {len(hypotheses)} hypotheses but "
            f"{len(references)} reference lists. Pass one list of references per hypothesis."
        )
    if len(hypotheses) == 0:
        raise ValueError("hypotheses is empty. Pass at least one generated text to score.")
    for index, (hypothesis, refs) in enumerate(zip(hypotheses, references)):
        if not isinstance(hypothesis, str):
            raise TypeError(
                f"hypotheses[{index}] is {type(hypothesis).__name__}, expected str"
            )
        if isinstance(refs, str):
            raise TypeError(
                f"references[{index}] is a str, expected a sequence of str. Wrap a single "
                f"reference in a list, e.g. [{refs[:30]!r}]."
            )
        if len(refs) == 0:
            raise ValueError(
                f"references[{index}] is empty, but every hypothesis needs at least one reference"
            )
        for ref in refs:
            if not isinstance(ref, str):
                raise TypeError(
                    f"references[{index}] contains a {type(ref).__name__}, expected str"
                )


# ---------------------------------------------------------------------------
# BLEU and ROUGE-L
# ---------------------------------------------------------------------------


def corpus_bleu(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    lowercase: bool = True,
) -> float:
    """Compute multi-reference corpus BLEU (0-100) with sacrebleu.

    Parameters
    ----------
    hypotheses : sequence of str
        One generated text per source.
    references : sequence of sequence of str
        The references of each hypothesis. Hypotheses may have different numbers of
        references (the E2E development set has 2 to 43 per meaning representation).
    lowercase : bool, default True
        Lowercase hypotheses and references before matching. The default base model uses
        an uncased WordPiece vocabulary, so its output is lowercase and a cased BLEU would
        penalise every capital letter in the references. Set False for cased models.

    Returns
    -------
    float
        sacrebleu's corpus BLEU with its defaults otherwise (``13a`` tokenizer,
        exponential smoothing, n-grams up to 4).

    Raises
    ------
    ValueError
        If the two sequences differ in length, are empty, or a hypothesis has no reference.
    TypeError
        If a hypothesis or reference is not a string.
    """
    _check_corpus(hypotheses, references)

    # sacrebleu takes reference *streams*: stream k holds the k-th reference of every
    # hypothesis, and all streams must be as long as the hypotheses. A hypothesis with
    # fewer references is padded with None, which sacrebleu 2.x drops per segment
    # (Metric._cache_references in sacrebleu 2.6). Padding with "" would be wrong: an empty string is a real
    # reference of length 0 and can win the closest-reference-length choice of the
    # brevity penalty.
    num_streams = max(len(refs) for refs in references)
    streams: list[list[str | None]] = [
        [refs[k] if k < len(refs) else None for refs in references] for k in range(num_streams)
    ]
    bleu = BLEU(lowercase=lowercase)
    score = bleu.corpus_score(list(hypotheses), streams)  # type: ignore[arg-type]
    return float(score.score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Compute corpus ROUGE-L F1 (0-100) with rouge_score.

    Each hypothesis gets the F1 of its best reference (the maximum over its references),
    and the corpus score is the mean over hypotheses. ROUGE-L is the sentence-level LCS
    variant (``rougeL``, not ``rougeLsum``), from ``RougeScorer(["rougeL"],
    use_stemmer=False)``. Its tokenizer lowercases and splits on every character outside
    ``a-z0-9``, so accented letters and "£" act as separators.

    Raises
    ------
    ValueError, TypeError
        On the same invalid inputs as :func:`corpus_bleu`.
    """
    _check_corpus(hypotheses, references)

    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    total = 0.0
    for hypothesis, refs in zip(hypotheses, references):
        best = scorer.score_multi(list(refs), hypothesis)["rougeL"]
        total += best.fmeasure
    return 100.0 * total / len(hypotheses)


# ---------------------------------------------------------------------------
# Slot error rate
# ---------------------------------------------------------------------------
#
# A slot counts as realised when one of its patterns matches the normalised text
# (lowercased, accents removed, dashes unified). This is a lexical approximation: it
# does not check negation ("not cheap" realises priceRange[cheap]) or polarity
# (familyFriendly[no] is realised by "family friendly"), and it misses paraphrases
# outside the tables below. Values not in the tables are matched literally.
# NOTE: scoring each human reference of the E2E development set (devset.csv, 4,672 pairs)
# against its own meaning representation gives a rate of 0.090. Part of that is real
# omissions in the references, and part is paraphrases these rules miss.

_DASHES = dict.fromkeys(map(ord, "\u2010\u2011\u2012\u2013\u2014\u2212"), "-")

# Up to two words between a rating word and a rating cue ("low customer rating",
# "rated it as average"). Commas and sentence ends stop the window, so "low price
# range, rated 5 out of 5" does not realise customer rating[low].
_GAP = r"(?:[^\w.,;:!?]+\w+){0,2}?[^\w.,;:!?]+"
_RATING_CUE = r"(?:rat\w*|review\w*|scor\w*)"


def _near_rating_cue(words: str) -> str:
    """Return a pattern for ``words`` within two words of a rating cue, in either order."""
    return rf"(?:{words}){_GAP}{_RATING_CUE}|{_RATING_CUE}{_GAP}(?:{words})"


def _out_of_five(digit: str, word: str) -> tuple[str, ...]:
    """Return patterns for "N out of 5", "N of 5", "N/5" and "N star(s)"."""
    number = rf"(?:{digit}|{word})"
    return (
        rf"{number}\s*(?:out of|of|/)\s*(?:5|five)",
        rf"{number}[- ]?stars?",
    )


# Attributes whose every value is realised by the same words.
_ATTRIBUTE_PATTERNS: dict[str, tuple[str, ...]] = {
    # familyFriendly[yes] and [no]: any mention of families, kids or children, in any form
    # ("family-friendly", "families", "kid friendly", "children"), or of adults ("adults
    # only"). Polarity is not checked.
    "familyfriendly": (r"famil\w*", r"kids?", r"kiddies", r"child\w*", r"adults?"),
}

# (attribute, value), both lowercased, to the patterns that realise that value.
_VALUE_PATTERNS: dict[tuple[str, str], tuple[str, ...]] = {
    # A coffee shop is also called a coffee house or a café. "Café Sicilia" and other
    # landmark names are masked before this check, see slot_errors.
    ("eattype", "coffee shop"): (r"coffee[- ]?(?:shop|house|bar)s?", r"cafes?"),
    ("eattype", "pub"): (r"pubs?", r"public houses?"),
    ("eattype", "restaurant"): (r"restaurants?",),
    # "Fast food" is often hyphenated, and English food is often called British.
    ("food", "fast food"): (r"fast[- ]?foods?",),
    ("food", "english"): (r"english", r"british"),
    # City centre in British or American spelling, or its common paraphrases.
    ("area", "city centre"): (
         r"(?:city|town)[- ]?cent(?:re|er)s?",
         r"cent(?:re|er) of (?:the )?(?:city|town)",
         r"(?:in|to) the cent(?:re|er)",
         r"downtown",
         r"central(?:ly)?",
     ),
    # "riverside", "river", "riverfront", "riverbank".
    ("area", "riverside"): (r"river\w*",),
    # Under £20: an upper bound on 20, or a word for cheap, because E2E writers realise
    # "less than £20" both ways. The same words realise priceRange[cheap].
    ("pricerange", "less than £20"): (
         (r"(?:less than|under|below|lower than|cheaper than|up to|no more than)\s*£?\s*"
         r"(?:20|twenty)"),
        r"<\s*£?\s*20",
        r"cheap\w*",
        r"inexpensive",
        r"low[- ]?(?:pric\w*|cost)",
        r"affordabl\w*",
    ),
    # £20-25 as a range of the two numbers ("£20-25", "20-25", "£20 - £25", "20 to 25",
    # "between 20 and 25 pounds"), or a word for a middling price, because E2E writers
    # realise it both ways. The same words realise priceRange[moderate].
    ("pricerange", "£20-25"): (
         r"£?\s*20\s*(?:pounds\s*)?(?:-|to|and)\s*£?\s*25",
         r"moderate\w*",
         r"mid[- ]?(?:range\w*|pric\w*)",
         r"(?:average|medium|fair(?:ly)?)[- ]pric\w*",
         r"reasonabl\w*",
     ),
    # Over £30: a lower bound on 30, or a word for expensive.
    ("pricerange", "more than £30"): (
         (r"(?:more than|over|above|higher than|greater than|at least|upwards of|in excess of"
         r"|exceeding|from|starting at)\s*£?\s*(?:30|thirty)"),
        r"£?\s*30\s*(?:\+|plus|or more)",
        r"expensive",
        r"pric(?:ey|y)",
        r"high(?:ly)?[- ]?pric\w*",
    ),
    ("pricerange", "cheap"): (
         r"cheap\w*",
         r"inexpensive",
         r"low[- ]?(?:pric\w*|cost)",
         r"affordabl\w*",
     ),
    ("pricerange", "moderate"): (
         r"moderate\w*",
         r"mid[- ]?(?:range\w*|pric\w*)",
         r"(?:average|medium|fair(?:ly)?)[- ]pric\w*",
         r"reasonabl\w*",
     ),
    # A high price, not a high rating: "high" must sit right before a price word, or
    # right after "price range is".
    ("pricerange", "high"): (
         r"high(?:ly)?[- ]?pric\w*",
         r"high[- ](?:end|cost)",
         r"pric\w*(?: range)? (?:is |of )?high",
         r"expensive",
         r"pric(?:ey|y)",
     ),
    # Numeric ratings: "5 out of 5", "5/5", "five stars", "5-star".
    ("customer rating", "1 out of 5"): _out_of_five("1", "one"),
    ("customer rating", "3 out of 5"): _out_of_five("3", "three"),
    ("customer rating", "5 out of 5"): _out_of_five("5", "five"),
    # Word ratings need a rating cue nearby, because "high", "low" and "average" also
    # describe prices: "low customer rating", "rated it as average", "highly rated".
    ("customer rating", "low"): (_near_rating_cue(r"low\w*|poor\w*|bad\w*"),),
    ("customer rating", "average"): (
         _near_rating_cue(r"average\w*|mediocre|middling|moderate\w*"),
    ),
    ("customer rating", "high"): (_near_rating_cue(r"high\w*|top|well|excellent|great"),),
}

# Attributes that name a place. They are matched first and masked, so that a landmark
# such as "Raja Indian Cuisine" does not realise food[Indian].
_NAME_ATTRIBUTES = ("name", "near")


def _normalise(text: str) -> str:
    """Lowercase, strip accents ("Café" to "cafe"), unify dashes and collapse spaces."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(stripped.translate(_DASHES).lower().split())


def _literal_pattern(value: str) -> str:
    """Return a pattern for a value as written, with spaces and hyphens interchangeable.

    A leading "The" is optional, because "The Cricketers" is often written "Cricketers".
    """
    words = re.split(r"[\s-]+", _normalise(value))
    optional_article = ""
    if len(words) > 1 and words[0] == "the":
        optional_article = r"(?:the\s+)?"
        words = words[1:]
    return optional_article + r"[\s-]+".join(re.escape(word) for word in words)


@functools.lru_cache(maxsize=1024)
def _value_regex(attribute: str, value: str) -> re.Pattern[str]:
    """Return the compiled whole-word pattern that realises one attribute value."""
    key = (attribute.lower(), _normalise(value))
    fragments = _ATTRIBUTE_PATTERNS.get(key[0]) or _VALUE_PATTERNS.get(key)
    if fragments is None:
        fragments = (_literal_pattern(value),)
    return re.compile(r"(?<!\w)(?:" + "|".join(fragments) + r")(?!\w)")


def slot_errors(source: Mapping[str, str], hypothesis: str) -> list[str]:
    """Return the attribute names of ``source`` whose value ``hypothesis`` does not mention.

    Matching is case-insensitive, accent-insensitive and on word boundaries, with the
    E2E-specific paraphrase rules of this module (a lexical approximation: negation and
    polarity are not checked). Venue names (``name``, ``near``) are matched first and
    masked before the other attributes are checked. Only the source's own names are
    masked, so another landmark in the text ("Raja Indian Cuisine") can still realise a
    value. The names come back in the order of ``source``.

    Raises
    ------
    ValueError
        If an attribute value is empty.
    """
    _check_source(source)
    if not isinstance(hypothesis, str):
        raise TypeError(f"hypothesis is {type(hypothesis).__name__}, expected str")
    text = _normalise(hypothesis)
    missing: set[str] = set()

    # Venue and landmark names first, then mask them.
    for attribute in _NAME_ATTRIBUTES:
        if attribute not in source:
            continue
        pattern = _value_regex(attribute, _check_value(attribute, source[attribute]))
        masked, count = pattern.subn(" ", text)
        if count == 0:
            missing.add(attribute)
        text = masked

    # Every other attribute on the masked text.
    for attribute, value in source.items():
        if attribute in _NAME_ATTRIBUTES:
            continue
        if _value_regex(attribute, _check_value(attribute, value)).search(text) is None:
            missing.add(attribute)

    return [attribute for attribute in source if attribute in missing]


def _check_source(source: Mapping[str, str]) -> None:
    """Raise unless ``source`` is a mapping of attribute names to values."""
    if not isinstance(source, Mapping):
        raise TypeError(
            f"source is {type(source).__name__} {source!r:.60}, expected a mapping such as "
            "{'name': 'The Eagle', 'food': 'French'}. Parse E2E meaning representations "
            "into attribute dicts first."
        )


def _check_value(attribute: str, value: str) -> str:
    """Return ``value`` if it is a non-empty string, else raise naming the attribute."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"attribute {attribute!r} has value {value!r}, expected a non-empty string. "
            "Drop attributes that have no value from the source."
        )
    return value


def slot_error_rate(sources: Sequence[Mapping[str, str]], hypotheses: Sequence[str]) -> float:
    """Compute the share (0-1) of source attribute values missing from the generated texts.

    The rate counts missing values over all attribute values in the corpus, so a source
    with eight attributes weighs more than one with three. See :func:`slot_errors` for
    the matching rules.

    Raises
    ------
    ValueError
        If the sequences differ in length, or the corpus has no attribute values.
    """
    if len(sources) != len(hypotheses):
        raise ValueError(
            f"sources and hypotheses differ in length: {len(sources)} sources but "
            f"{len(hypotheses)} hypotheses. Pass one generated text per source."
        )
    for source in sources:
        _check_source(source)
    num_values = sum(len(source) for source in sources)
    if num_values == 0:
        raise ValueError(
            f"sources contain no attribute values ({len(sources)} sources): the slot error "
            "rate is undefined. Pass sources such as {'name': 'The Eagle', 'food': 'French'}."
        )
    num_missing = sum(
        len(slot_errors(source, hypothesis)) for source, hypothesis in zip(sources, hypotheses)
    )
    return num_missing / num_values


# ---------------------------------------------------------------------------
# All scores at once
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TextScores:
    """Corpus scores of generated texts against their sources and references.

    Attributes
    ----------
    bleu : float
        Lowercased multi-reference corpus BLEU, 0-100.
    rouge_l : float
        Mean best-reference ROUGE-L F1, 0-100.
    slot_error_rate : float
        Share of source attribute values missing from the texts, 0-1.
    num_sources : int
        Number of sources (one generated text each).
    """

    bleu: float
    rouge_l: float
    slot_error_rate: float
    num_sources: int


def score_generations(
    sources_fields: Sequence[Mapping[str, str]],
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
) -> TextScores:
    """Score one generated text per source with BLEU, ROUGE-L and slot error rate.

    Parameters
    ----------
    sources_fields : sequence of mapping
        The attributes of each source, e.g. ``{"name": "The Eagle", "food": "French"}``.
    hypotheses : sequence of str
        One generated text per source.
    references : sequence of sequence of str
        The human references of each source.
    """
    if len(sources_fields) != len(hypotheses):
        raise ValueError(
            f"sources_fields and hypotheses differ in length: {len(sources_fields)} sources "
            f"but {len(hypotheses)} hypotheses. Pass one generated text per source."
        )
    return TextScores(
        bleu=corpus_bleu(hypotheses, references),
        rouge_l=rouge_l(hypotheses, references),
        slot_error_rate=slot_error_rate(sources_fields, hypotheses),
        num_sources=len(sources_fields),
    )
