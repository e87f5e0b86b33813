"""Local training of the LoRA adapter: Opacus DP-SGD with a per-sample causal LM loss."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from opacus import GradSampleModule, PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, Dataset

from client.secure_dp import SecureDPOptimizer, make_secure
from common.config import PrivacyConfig, TrainConfig
from common.text import IGNORE_INDEX, EncodedExample

logger = logging.getLogger(__name__)


class PerSampleCausalLoss(nn.Module):
    """Causal LM loss of each sample, averaged over that sample's own target tokens.

    A Hugging Face model's built-in loss averages tokens over the whole batch, which does not
    decompose into per-sample terms, so Opacus would clip the wrong gradients. This module
    returns a ``(B,)`` vector instead. Logits are computed only at target positions: the
    vocabulary projection dominates the cost on CPU, and it is frozen, so gathering its
    inputs across the batch does not disturb per-sample gradients of the trained layers.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if hasattr(base, "cls"):
            # BERT decoder: the transform (dense, GELU, LayerNorm) runs on the full (B, T, H)
            # batch, so it keeps per-sample gradients when it is trained; only the frozen
            # vocabulary projection receives the gathered target positions.
            transform, decoder = base.cls.predictions.transform, base.cls.predictions.decoder
        else:
            transform, decoder = nn.Identity(), base.get_output_embeddings()
        # A tuple keeps these out of the module tree: registering them twice would make
        # Opacus attach its per-sample hooks twice.
        self._parts = (base.base_model, transform, decoder)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        backbone, transform, decoder = self._parts
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask)[0]  # (B, T, H)
        hidden = transform(hidden)  # (B, T, H)
        targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted from position t
        selected = targets != IGNORE_INDEX  # (B, T-1)
        logits = decoder(hidden[:, :-1][selected])  # (N, V), N = target tokens in batch
        token_loss = nn.functional.cross_entropy(
            logits.float(), targets[selected], reduction="none"
        )  # (N,)
        sample_index = torch.nonzero(selected, as_tuple=True)[0]  # (N,)
        batch_size = input_ids.shape[0]
        loss_sum = torch.zeros(batch_size, dtype=token_loss.dtype, device=token_loss.device)
        loss_sum = loss_sum.index_add(0, sample_index, token_loss)
        counts = selected.sum(dim=1).clamp(min=1)
        return loss_sum / counts  # (B,)


class EncodedDataset(Dataset):
    """Examples padded to the dataset's longest example; batches are trimmed later."""

    def __init__(self, examples: Sequence[EncodedExample], pad_token_id: int) -> None:
        if not examples:
            raise ValueError("cannot train on an empty partition: give the client records")
        width = max(len(e.input_ids) for e in examples)
        self.input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
        self.labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        self.attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, example in enumerate(examples):
            n = len(example.input_ids)
            self.input_ids[i, :n] = torch.tensor(example.input_ids)
            self.labels[i, :n] = torch.tensor(example.labels)
            self.attention_mask[i, :n] = 1

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.input_ids[index], self.attention_mask[index], self.labels[index]


@dataclass(frozen=True)
class LocalTrainResult:
    """Summary of one round of local training."""

    num_examples: int
    steps: int
    train_loss: float
    sample_rate: float
    noise_multiplier: float
    secure_mode: bool = False  # DP noise and Poisson sampling came from the OS CSPRNG


_insecure_warned = False


def _warn_insecure_noise_once() -> None:
    global _insecure_warned
    if not _insecure_warned:
        logger.warning(
            "train: privacy.secure-mode is off: DP noise comes from a non-cryptographic "
            "generator; set privacy.production = true for deployments"
        )
        _insecure_warned = True


@contextlib.contextmanager
def _quiet_opacus() -> Iterator[None]:
    """Silence Opacus and PyTorch warnings that repeat every round and carry no news.

    The insecure-RNG warning is replaced by one log line per process; the backward-hook
    warning fires because the inputs of the frozen embeddings need no gradient; PRV's
    "optimal order" note concerns the RDP bound it computes alongside.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def sample_rate_for(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate q = expected batch size / dataset size, at most 1."""
    return min(1.0, batch_size / num_examples)


def steps_per_round(num_examples: int, batch_size: int, local_epochs: float) -> int:
    """Optimizer steps in one round: ``local_epochs`` passes of expected batch size."""
    return max(1, math.ceil(local_epochs / sample_rate_for(num_examples, batch_size)))


def _trim(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Drop padding columns beyond the longest example in the batch."""
    input_ids, attention_mask, labels = batch
    if input_ids.shape[0] == 0:
        return input_ids[:, :2], attention_mask[:, :2], labels[:, :2]
    width = int(attention_mask.sum(dim=1).max())
    return input_ids[:, :width], attention_mask[:, :width], labels[:, :width]


class ProximalTerm:
    """FedProx's proximal term ``mu / 2 * ||w - w_global||^2`` over the trained tensors.

    T. Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.
    ``w_global`` is a copy of ``params`` when the term is created, i.e. the adapter the
    server sent this round. The term is added to every sample's loss, so the batch loss
    ``(1/B) Σ_i (loss_i + term)`` equals ``mean(loss_i) + term``, FedProx's local objective.

    Under DP-SGD the term must be inside each sample's loss, so that clipping bounds each
    sample's whole gradient and the noise calibrated to ``clipping_norm`` covers it.
    Opacus' hooks build per-sample gradients from layer activations only, and a term that
    reads the parameters directly never reaches ``grad_sample``, so
    :meth:`add_to_grad_samples` adds its gradient ``mu * (w - w_global)`` to every row.
    Opacus (``loss_reduction="mean"``) then clips each row ``∇loss_i + mu (w - w_global)``,
    sums the rows, adds noise and divides by the expected batch size ``q * n``: the
    proximal pull is clipped and noised with the data gradient, and the sensitivity stays
    ``clipping_norm``. An empty Poisson batch has no rows, so that step gets noise but no
    proximal pull, like the data term.
    """

    def __init__(self, params: Sequence[nn.Parameter], *, mu: float) -> None:
        self.mu = mu
        self.params = list(params)
        self.anchors = [p.detach().clone() for p in self.params]

    def value(self) -> torch.Tensor:
        """``mu / 2 * ||w - w_global||^2`` as a differentiable scalar."""
        total = sum(((p - a) ** 2).sum() for p, a in zip(self.params, self.anchors))
        return 0.5 * self.mu * total

    def add_to_grad_samples(self) -> None:
        """Add ``mu * (w - w_global)`` to each sample's row of ``p.grad_sample``."""
        with torch.no_grad():
            for p, anchor in zip(self.params, self.anchors):
                grad_sample = p.grad_sample  # (B, *p.shape)
                grad_sample += (self.mu * (p - anchor)).unsqueeze(0)


def _set_empty_grad_samples(loss_module: GradSampleModule) -> None:
    """Give each trained tensor a per-sample gradient with zero rows, for an empty batch.

    BERT's attention cannot reshape a batch of zero samples, so an empty Poisson batch
    skips the forward pass. Opacus' DPOptimizer then clips no rows and still adds the
    step's noise, as the privacy accounting of that step assumes.
    """
    for p in loss_module.parameters():
        if p.requires_grad:
            p.grad_sample = p.new_zeros((0, *p.shape))


def backward_batch(
    loss_module: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    proximal: ProximalTerm | None = None,
) -> torch.Tensor:
    """Run forward and backward on one batch and return the ``(B,)`` per-sample losses.

    Gradients land in ``p.grad``, or in ``p.grad_sample`` when ``loss_module`` is an
    Opacus ``GradSampleModule``; the proximal term goes where the optimizer reads them.
    """
    input_ids, attention_mask, labels = batch
    private = isinstance(loss_module, GradSampleModule)
    if private and input_ids.shape[0] == 0:
        _set_empty_grad_samples(loss_module)
        return torch.zeros(0)
    per_sample = loss_module(input_ids, attention_mask, labels)  # (B,)
    # Mean over the actual batch; Opacus rescales by the batch size it observes,
    # and an empty Poisson batch contributes a zero gradient plus the step's noise.
    loss = per_sample.sum() / max(1, per_sample.shape[0])
    if proximal is not None and not private:
        loss = loss + proximal.value()
    loss.backward()
    if proximal is not None and private:
        proximal.add_to_grad_samples()
    return per_sample


def make_optimizer(
    named_params: Sequence[tuple[str, nn.Parameter]], train: TrainConfig
) -> torch.optim.Optimizer:
    """Build the local optimizer that ``train.optimizer`` names.

    The trained head transform (PEFT ``modules_to_save``) gets ``train.head_learning_rate``
    when it is set; every other tensor gets ``train.learning_rate``.
    """
    head_rate = train.head_learning_rate or train.learning_rate
    head = [p for name, p in named_params if "modules_to_save" in name]
    rest = [p for name, p in named_params if "modules_to_save" not in name]
    groups = [{"params": rest}]
    if head:
        groups.append({"params": head, "lr": head_rate})
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=train.learning_rate, momentum=train.momentum, weight_decay=train.weight_decay
        )
    return torch.optim.AdamW(groups, lr=train.learning_rate, weight_decay=train.weight_decay)


def train_local(
    model: nn.Module,
    examples: Sequence[EncodedExample],
    *,
    train: TrainConfig,
    privacy: PrivacyConfig,
    noise_multiplier: float,
    pad_token_id: int,
    seed: int,
    device: torch.device | str = "cpu",
    steps: int | None = None,
    proximal_mu: float = 0.0,
) -> LocalTrainResult:
    """Train the adapter's trainable tensors in place for one round.

    With ``privacy.dp`` the loop is Opacus DP-SGD: Poisson sampling at rate
    q = batch_size / n, per-sample clipping to ``privacy.clipping_norm`` and Gaussian noise
    of standard deviation ``noise_multiplier * clipping_norm`` per step. ``steps`` defaults to
    :func:`steps_per_round`; the caller accounts for exactly the steps taken.
    ``proximal_mu > 0`` adds FedProx's proximal term around the adapter the model holds
    on entry (:class:`ProximalTerm`).

    With ``privacy.secure_mode`` the noise and the Poisson draws come from the operating
    system's CSPRNG (:func:`client.secure_dp.make_secure`) and cannot be reproduced;
    otherwise both come from a generator seeded with ``seed``.

    NOTE: Opacus sets q = 1 / ceil(n / batch_size), which is below batch_size / n when
    batch_size does not divide n, so the ledger's q overstates the sampling rate there.
    """
    dataset = EncodedDataset(examples, pad_token_id)
    num_examples = len(dataset)
    sample_rate = sample_rate_for(num_examples, train.batch_size)
    num_steps = steps if steps is not None else steps_per_round(
        num_examples, train.batch_size, train.local_epochs
    )
    generator = torch.Generator().manual_seed(seed)
    loss_module = PerSampleCausalLoss(model).to(device)
    loss_module.train()
    named = [(name, p) for name, p in loss_module.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    proximal = ProximalTerm(params, mu=proximal_mu) if proximal_mu > 0 else None
    optimizer = make_optimizer(named, train)
    loader = DataLoader(
        dataset,
        batch_size=min(train.batch_size, num_examples),
        shuffle=True,
        generator=generator,
    )

    if privacy.dp:
        if not privacy.secure_mode:
            _warn_insecure_noise_once()
        with _quiet_opacus():
            # Opacus' own secure mode needs the torchcsprng package, so make_secure below
            # replaces the seeded noise and sampling instead.
            engine = PrivacyEngine(secure_mode=False)
            loss_module, optimizer, loader = engine.make_private(
                module=loss_module,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=privacy.clipping_norm,
                poisson_sampling=True,
                noise_generator=None if privacy.secure_mode else generator,
                grad_sample_mode="hooks",
            )
        assert isinstance(loss_module, GradSampleModule)
        if privacy.secure_mode:
            optimizer, loader = make_secure(optimizer, loader)

    losses: list[float] = []
    with _quiet_opacus():
        taken = _run_steps(loss_module, optimizer, loader, num_steps, losses, device, proximal)
    if privacy.dp:
        # Remove Opacus hooks so the same model object can be reused next round.
        loss_module._close()
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return LocalTrainResult(
        num_examples=num_examples,
        steps=taken,
        train_loss=mean_loss,
        sample_rate=sample_rate if privacy.dp else 0.0,
        noise_multiplier=noise_multiplier if privacy.dp else 0.0,
        secure_mode=isinstance(optimizer, SecureDPOptimizer),
    )


def _run_steps(
    loss_module: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    num_steps: int,
    losses: list[float],
    device: torch.device | str,
    proximal: ProximalTerm | None = None,
) -> int:
    """Take ``num_steps`` optimizer steps, cycling over the loader; append batch losses."""
    taken = 0
    while taken < num_steps:
        for batch in loader:
            trimmed = tuple(t.to(device) for t in _trim(batch))
            optimizer.zero_grad(set_to_none=True)
            per_sample = backward_batch(loss_module, trimmed, proximal)  # (B,)
            optimizer.step()
            if per_sample.shape[0] > 0:
                losses.append(float(per_sample.detach().mean()))
            taken += 1
            if taken >= num_steps:
                break
    return taken


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    examples: Sequence[EncodedExample],
    *,
    pad_token_id: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> float:
    """Mean per-sample loss over ``examples`` (no DP: evaluation releases one number)."""
    dataset = EncodedDataset(examples, pad_token_id)
    loss_module = PerSampleCausalLoss(model).to(device)
    loss_module.eval()
    total = 0.0
    for batch in DataLoader(dataset, batch_size=batch_size):
        input_ids, attention_mask, labels = (t.to(device) for t in _trim(batch))
        total += float(loss_module(input_ids, attention_mask, labels).sum())
    loss_module.train()
    return total / len(dataset)
