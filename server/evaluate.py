"""Server-side evaluation of the global adapter on held-out records: loss and BLEU."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from client.train import evaluate_loss
from common.adapter import set_adapter_arrays
from common.data import AdRecord
from common.generation import generate_texts
from common.metrics import corpus_bleu, rouge_l
from common.text import encode_records
from simulations.partition import group_references

logger = logging.getLogger(__name__)


@dataclass
class ServerEvaluator:
    """Scores adapters on a fixed sample of held-out records.

    ``loss_records`` bounds the records used for the loss and ``num_sources`` the distinct
    sources generated for BLEU and ROUGE-L (greedy decoding, all references of a source).
    Both samples are drawn once with ``seed``, so every round is scored on the same records.
    """

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    test_records: Sequence[AdRecord]
    num_sources: int = 24
    loss_records: int = 256
    max_length: int = 128
    max_new_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        records = list(self.test_records)
        order = rng.permutation(len(records))[: self.loss_records]
        self._loss_examples = encode_records(
            self.tokenizer, [records[i] for i in sorted(order)], max_length=self.max_length
        )
        groups = group_references(records)
        chosen = sorted(rng.permutation(len(groups))[: self.num_sources])
        self._sources = [groups[i][0] for i in chosen]
        self._references = [groups[i][1] for i in chosen]

    def __call__(self, arrays: dict[str, np.ndarray], *, with_generation: bool = True) -> dict:
        """Return ``eval-loss`` and, with generation, ``bleu`` and ``rouge-l``."""
        set_adapter_arrays(self.model, arrays)
        metrics: dict[str, float] = {
            "eval-loss": evaluate_loss(
                self.model, self._loss_examples, pad_token_id=int(self.tokenizer.pad_token_id or 0)
            )
        }
        if with_generation and self._sources:
            hypotheses = [
                texts[0]
                for texts in generate_texts(
                    self.model,
                    self.tokenizer,
                    self._sources,
                    max_new_tokens=self.max_new_tokens,
                )
            ]
            metrics["bleu"] = corpus_bleu(hypotheses, self._references)
            metrics["rouge-l"] = rouge_l(hypotheses, self._references)
        return metrics
