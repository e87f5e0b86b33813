"""Token layout of (source, text) pairs for causal LM training and generation.

BERT decoders see ``[CLS] source [SEP] text [SEP]``; other causal LMs see
``source \\n text <eos>``. The loss covers the text and its end token only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one record; ``labels`` is ``IGNORE_INDEX`` on the prompt."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def _uses_cls_sep(tokenizer: PreTrainedTokenizerBase) -> bool:
    return tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None


def end_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Token that ends a generated text ([SEP] for BERT, EOS otherwise)."""
    if _uses_cls_sep(tokenizer):
        return int(tokenizer.sep_token_id)
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has neither [SEP] nor an EOS token: "
            "set tokenizer.eos_token before training"
        )
    return int(tokenizer.eos_token_id)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, source: str) -> list[int]:
    """Token ids of the prompt that precedes the generated text."""
    ids = tokenizer(source, add_special_tokens=False)["input_ids"]
    if _uses_cls_sep(tokenizer):
        return [int(tokenizer.cls_token_id), *ids, int(tokenizer.sep_token_id)]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    bos = [int(tokenizer.bos_token_id)] if tokenizer.bos_token_id is not None else []
    return [*bos, *ids, *newline]


def encode_example(
    tokenizer: PreTrainedTokenizerBase, source: str, text: str, *, max_length: int, origin: str = ""
) -> EncodedExample:
    """Encode one record; a record longer than ``max_length`` tokens is an error."""
    prompt = prompt_ids(tokenizer, source)
    target = [*tokenizer(text, add_special_tokens=False)["input_ids"], end_token_id(tokenizer)]
    length = len(prompt) + len(target)
    if length > max_length:
        where = f"{origin}: " if origin else ""
        raise ValueError(
            f"{where}record is {length} tokens long, over model.max-length = {max_length}: "
            "shorten the record or raise --max-length / model.max-length"
        )
    return EncodedExample(
        input_ids=(*prompt, *target),
        labels=(*([IGNORE_INDEX] * len(prompt)), *target),
    )


def encode_records(
    tokenizer: PreTrainedTokenizerBase, records: Sequence, *, max_length: int
) -> list[EncodedExample]:
    """Encode records that have ``source``, ``text`` and ``origin`` attributes."""
    return [
        encode_example(tokenizer, r.source, r.text, max_length=max_length, origin=r.origin)
        for r in records
    ]
