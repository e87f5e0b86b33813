"""Token-tree scoring of many texts after one prompt, against one full forward per text."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.config import ModelConfig
from common.model import build_lora_model, load_tokenizer
from common.text import encode_example
from simulations.audit import CanaryFormat
from simulations.perplexity import log_perplexities

SOURCE = "name[The Eagle], eatType[coffee shop], food[French]"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = build_lora_model(ModelConfig(), seed=0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)  # a non-trivial adapter
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm-l6")


def reference_bits(model, tokenizer, texts: list[str]) -> list[float]:
    """One full forward per text, scoring every token after the texts' shared prefix."""
    sequences = [
        encode_example(tokenizer, SOURCE, text, max_length=192).input_ids[:-1] for text in texts
    ]
    shared = 0
    while all(len(s) > shared and s[shared] == sequences[0][shared] for s in sequences):
        shared += 1
    model.eval()
    bits = []
    for sequence in sequences:
        ids = torch.tensor([sequence])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        token_log_probs = log_probs.gather(-1, ids[0, 1:, None])[:, 0]  # (T-1,)
        bits.append(-float(token_log_probs[shared - 1 :].sum()) / math.log(2))
    return bits


def test_log_perplexities_match_full_forward(model, tokenizer):
    fmt = CanaryFormat()
    # Codes of 2 to 5 WordPiece tokens, some sharing their first tokens.
    codes = (482915, 482916, 482000, 0, 999999, 123456, 777001, 100000, 31415)
    texts = [fmt.render(code) for code in codes]
    lengths = {len(tokenizer.tokenize(text)) for text in texts}
    assert len(lengths) >= 3

    scores = log_perplexities(model, tokenizer, SOURCE, texts, batch_size=2)

    assert scores.tolist() == pytest.approx(reference_bits(model, tokenizer, texts), rel=1e-4)
    assert len(set(scores.tolist())) == len(texts)


def test_log_perplexities_of_texts_that_differ_in_words(model, tokenizer):
    texts = ["my voucher code is 482915", "my coupon is 12", "book a table for two tonight"]
    scores = log_perplexities(model, tokenizer, SOURCE, texts)
    assert scores.tolist() == pytest.approx(reference_bits(model, tokenizer, texts), rel=1e-4)


def test_log_perplexities_do_not_depend_on_batch_size(model, tokenizer):
    fmt = CanaryFormat(digits=3)
    texts = [fmt.render(code) for code in range(fmt.space)]  # a whole code space
    whole = log_perplexities(model, tokenizer, SOURCE, texts, batch_size=512)
    small = log_perplexities(model, tokenizer, SOURCE, texts, batch_size=7)
    np.testing.assert_allclose(whole, small, rtol=1e-5)
    sample = [0, 1, 99, 500, 999]
    expected = reference_bits(model, tokenizer, [texts[i] for i in sample])
    assert whole[sample].tolist() == pytest.approx(expected, rel=1e-4)


def test_log_perplexities_need_differing_texts(model, tokenizer):
    with pytest.raises(ValueError, match="differ after it"):
        log_perplexities(model, tokenizer, SOURCE, ["same text", "same text"])
    with pytest.raises(ValueError, match="differ after it"):
        log_perplexities(model, tokenizer, SOURCE, ["my code", "my code is 12"])
    with pytest.raises(ValueError, match="at least 2"):
        log_perplexities(model, tokenizer, SOURCE, ["my code"])


def test_log_perplexities_reject_a_text_over_max_length(model, tokenizer):
    with pytest.raises(ValueError, match="over model.max-length = 24"):
        log_perplexities(model, tokenizer, SOURCE, ["short", "word " * 40], max_length=24)
