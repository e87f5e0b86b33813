"""Ad text generation from sources with a (LoRA-adapted) causal language model."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from common.text import end_token_id, prompt_ids

logger = logging.getLogger(__name__)


@torch.no_grad()
def generate_texts(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[str],
    *,
    max_new_tokens: int = 64,
    min_new_tokens: int = 1,
    num_return_sequences: int = 1,
    do_sample: bool = False,
    num_beams: int = 1,
    temperature: float = 0.8,
    top_p: float = 0.9,
    no_repeat_ngram_size: int = 3,
    batch_size: int = 16,
    seed: int = 0,
    show_progress: bool = False,
) -> list[list[str]]:
    """Generate ``num_return_sequences`` texts for each source, in the order of ``sources``.

    Prompts are batched only with prompts of the same token length: BERT decoders use
    absolute positions from 0, so left padding would shift every position and degrade the
    output. Greedy decoding is the default; ``do_sample`` draws with temperature and top-p.
    ``no_repeat_ngram_size`` blocks repeated trigrams, which small decoders otherwise
    produce ("it is not family friendly. it is not family friendly."). ``min_new_tokens``
    keeps the end token away until that many tokens are written, so no text is empty (a
    beam that ends at once would otherwise be one of the ``num_return_sequences``).
    """
    if num_return_sequences > 1 and not do_sample and num_beams < num_return_sequences:
        num_beams = num_return_sequences
    device = next(model.parameters()).device
    end_id = end_token_id(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    encoded = [prompt_ids(tokenizer, source) for source in sources]
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, ids in enumerate(encoded):
        by_length[len(ids)].append(index)
    batches = [
        indices[start : start + batch_size]
        for _, indices in sorted(by_length.items())
        for start in range(0, len(indices), batch_size)
    ]

    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    outputs: list[list[str]] = [[] for _ in sources]
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not show_progress):
        input_ids = torch.tensor([encoded[i] for i in batch], device=device)  # (B, T)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=do_sample,
            num_beams=num_beams,
            num_return_sequences=num_return_sequences,
            temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None,
            top_k=None,
            no_repeat_ngram_size=no_repeat_ngram_size,
            eos_token_id=end_id,
            pad_token_id=pad_id,
        )  # (B * K, T + new)
        new_tokens = generated[:, input_ids.shape[1] :]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for row, text in enumerate(texts):
            outputs[batch[row // num_return_sequences]].append(clean_text(text))
    if was_training:
        model.train()
    return outputs


def clean_text(text: str) -> str:
    """Undo WordPiece spacing around punctuation (``it ' s`` -> ``it's``)."""
    text = " ".join(text.split())
    for before, after in ((" ' ", "'"), (" .", "."), (" ,", ","), (" !", "!"), (" ?", "?")):
        text = text.replace(before, after)
    text = text.replace("£ ", "£").replace(" - ", "-")
    if text and text[0].islower():
        text = text[0].upper() + text[1:]
    return text
