"""Log-perplexities of many texts after one prompt, scored once per node of their token tree.

Texts of one format (``"my voucher code is 482915"`` for every 6-digit code) share most of
their tokens. Scoring each text with its own forward pass repeats the same computation for
every shared token. Here the texts' tokens after the longest prefix they all share form a
tree: each node is a token sequence that at least one text continues, and one forward pass
per node gives the probability of each of its children. The 10^6 codes of 6 digits have
about 74,000 such nodes under the MiniLM WordPiece vocabulary, so a whole code space costs
about a tenth of the token positions that per-text scoring needs.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from common.text import encode_example, end_token_id, prompt_ids

# Texts tokenized per call; bounds the tokenizer's batch memory on large code spaces.
_TOKENIZE_CHUNK = 20_000


def _cache_keyword(model: torch.nn.Module) -> str:
    """Keyword of the key/value cache argument: ``cache`` from transformers 5 on."""
    forward = model.get_base_model().forward if isinstance(model, PeftModel) else model.forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _target_ids(
    tokenizer: PreTrainedTokenizerBase, source: str, texts: Sequence[str], *, max_length: int
) -> tuple[list[int], list[list[int]]]:
    """Encode the prompt and each text as ``common.text.encode_example`` lays them out.

    The end-of-text token is left out, because the secret is the text, not where it stops.
    """
    prompt = prompt_ids(tokenizer, source)
    room = max_length - len(prompt) - 1  # one position for the end-of-text token
    targets: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = list(texts[start : start + _TOKENIZE_CHUNK])
        for text, ids in zip(
            chunk, tokenizer(chunk, add_special_tokens=False)["input_ids"], strict=True
        ):
            if len(ids) > room:
                encode_example(tokenizer, source, text, max_length=max_length)  # raises
            targets.append(ids)
    end_token_id(tokenizer)  # fails early for a tokenizer that cannot end a text
    return prompt, targets


def _shared_length(targets: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix that every target starts with."""
    first = targets[0]
    length = min(len(t) for t in targets)
    for target in targets[1:]:
        position = 0
        while position < length and target[position] == first[position]:
            position += 1
        length = position
    return length


@torch.no_grad()
def log_perplexities(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    max_length: int = 512,
    show_progress: bool = False,
) -> np.ndarray:
    """Return ``-log2 P`` of each text's tokens after the prefix all texts share.

    Each text is laid out as in training (``common.text.encode_example``) after the prompt
    of ``source``. Tokens up to the longest common token prefix of all texts have the same
    probability for every text, so only the tokens after it are scored. The shared prefix
    runs once, and its key/value cache serves every batch. After it, each node of the
    texts' token tree runs once, in batches of ``batch_size`` nodes of the same depth, so
    no padding is needed. The end-of-text token is not scored.

    Returns
    -------
    numpy.ndarray
        ``(len(texts),)`` log-perplexities in bits; lower means more likely.
    """
    if len(texts) < 2:
        raise ValueError(f"log_perplexities: got {len(texts)} text(s), expected at least 2")
    prompt, targets = _target_ids(tokenizer, source, texts, max_length=max_length)
    shared = _shared_length(targets)
    tails = [tuple(t[shared:]) for t in targets]
    if any(not tail for tail in tails):
        raise ValueError(
            "log_perplexities: the texts must share their prompt and differ after it, "
            "e.g. one format filled with different codes"
        )
    context = [*prompt, *targets[0][:shared]]

    # The token tree: each node (a tuple of tokens after the context) and the tokens that
    # follow it in some text. The root () is the context itself.
    children: dict[tuple[int, ...], set[int]] = defaultdict(set)
    for tail in tails:
        for depth, token in enumerate(tail):
            children[tail[:depth]].add(token)
    levels: dict[int, list[tuple[int, ...]]] = defaultdict(list)
    for node in children:
        levels[len(node)].append(node)

    model.eval()
    device = next(model.parameters()).device
    keyword = _cache_keyword(model)
    # The last context token predicts each first differing token, so it starts every row.
    prefix_cache = None
    if len(context) > 1:
        prefix = torch.tensor([context[:-1]], device=device)  # (1, C-1)
        output = model(input_ids=prefix, use_cache=True)
        prefix_cache = getattr(output, "cache", None) or output.past_key_values

    edge_nats: dict[tuple[int, ...], float] = {}  # node + child token -> -ln P(child | node)
    total = sum(math.ceil(len(nodes) / batch_size) for nodes in levels.values())
    progress = tqdm(total=total, desc="scoring", unit="batch", disable=not show_progress)
    for depth in sorted(levels):
        nodes = levels[depth]
        for start in range(0, len(nodes), batch_size):
            batch = nodes[start : start + batch_size]
            rows = [[context[-1], *node] for node in batch]
            input_ids = torch.tensor(rows, dtype=torch.long, device=device)  # (B, depth+1)
            kwargs = {}
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(batch))
                kwargs[keyword] = cache
            attention_mask = torch.ones(
                (len(batch), len(context) - 1 + depth + 1), dtype=torch.long, device=device
            )
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
            ).logits[:, -1]  # (B, V): the distribution of each node's next token
            log_probs = torch.log_softmax(logits.float(), dim=-1)

            # Gather every child of every node of the batch in one indexing step.
            pairs = [(row, token) for row, node in enumerate(batch) for token in children[node]]
            row_index = torch.tensor([p[0] for p in pairs], device=device)
            token_index = torch.tensor([p[1] for p in pairs], device=device)
            nats = (-log_probs[row_index, token_index]).cpu().tolist()
            for (row, token), value in zip(pairs, nats, strict=True):
                edge_nats[(*batch[row], token)] = value
            progress.update(1)
    progress.close()

    scores = np.empty(len(tails), dtype=np.float64)
    for index, tail in enumerate(tails):
        scores[index] = sum(edge_nats[tail[: depth + 1]] for depth in range(len(tail)))
    return scores / math.log(2)
