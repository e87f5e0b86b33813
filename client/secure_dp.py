"""Opacus DP-SGD with noise and Poisson sampling drawn from the OS CSPRNG (``common.secure_rng``).

``PrivacyEngine(secure_mode=True)`` in Opacus 1.6 needs the ``torchcsprng`` package. Here the
engine runs with ``secure_mode=False`` and :func:`make_secure` then replaces the two random
parts of what ``make_private`` built: the DP optimizer's noise and the data loader's batch
sampler. Per-sample clipping, loss-reduction scaling, the per-sample gradient hooks and the
empty-batch handling stay Opacus' own code.
"""

from __future__ import annotations

import numpy as np
import torch
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Sampler

from common import secure_rng


def gaussian_like(reference: torch.Tensor, std: float) -> torch.Tensor:
    """Hardened N(0, ``std``²) noise (:func:`common.secure_rng.gaussian`) shaped like ``reference``."""
    if std == 0:
        return torch.zeros_like(reference)
    noise = secure_rng.gaussian(reference.numel(), std).reshape(reference.shape)
    return torch.from_numpy(noise).to(device=reference.device, dtype=reference.dtype)


class SecureDPOptimizer(DPOptimizer):
    """Opacus' ``DPOptimizer`` (flat clipping, one process) with noise from the OS CSPRNG.

    Only :meth:`add_noise` differs: it adds :func:`gaussian_like` noise of standard deviation
    ``noise_multiplier * max_grad_norm`` to each clipped and summed gradient.
    ``clip_and_accumulate`` and ``scale_grad`` (division by ``expected_batch_size``) are
    inherited unchanged.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int | None,
        loss_reduction: str = "mean",
    ) -> None:
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=None,
            secure_mode=True,
        )

    def add_noise(self) -> None:
        """Add secure noise to the clipped gradients and store the result in ``p.grad``."""
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            # Opacus' guard against reusing a gradient without zero_grad() in between.
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + gaussian_like(p.summed_grad, std)).view_as(p)
            _mark_as_processed(p.summed_grad)


class SecurePoissonSampler(Sampler[list[int]]):
    """Poisson sampling of batch indices: each record joins a batch with probability ``sample_rate``.

    The same sampling as Opacus' ``UniformWithReplacementSampler``, with each record's
    Bernoulli draw compared against a 53-bit uniform from the OS CSPRNG. A batch may be
    empty, and the loader's collate function must handle that. ``steps`` batches make one
    pass.
    """

    def __init__(self, *, num_samples: int, sample_rate: float, steps: int) -> None:
        if num_samples <= 0:
            raise ValueError(f"invalid num_samples {num_samples}: expected an integer > 0")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"invalid sample_rate {sample_rate}: expected 0 < rate <= 1")
        if steps <= 0:
            raise ValueError(f"invalid steps {steps}: expected an integer > 0")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            selected = secure_rng.uniform(self.num_samples) < self.sample_rate
            yield np.flatnonzero(selected).tolist()


def secure_poisson_loader(loader: DPDataLoader) -> DataLoader:
    """Build a loader like ``loader`` whose batches come from :class:`SecurePoissonSampler`.

    It keeps ``loader``'s dataset, sample rate, number of batches per pass and collate
    function, which is Opacus' wrapper that turns an empty batch into tensors with a batch
    dimension of 0.
    """
    sampler = SecurePoissonSampler(
        num_samples=len(loader.dataset),  # type: ignore[arg-type]
        sample_rate=loader.sample_rate,
        steps=len(loader),
    )
    return DataLoader(
        loader.dataset,
        batch_sampler=sampler,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


def make_secure(
    optimizer: DPOptimizer, loader: DataLoader
) -> tuple[SecureDPOptimizer, DataLoader]:
    """Replace the random parts of what ``PrivacyEngine.make_private`` returned.

    ``optimizer`` must be a plain ``DPOptimizer`` (flat clipping, one process), and
    ``loader`` a single-process ``DPDataLoader`` (``poisson_sampling=True``). Anything else
    raises TypeError, so a run marked secure never trains with a seeded generator. The new
    optimizer wraps the same underlying optimizer with the same noise multiplier, clipping
    norm, expected batch size, loss reduction and step hook.
    """
    if type(optimizer) is not DPOptimizer:
        raise TypeError(
            f"secure mode supports Opacus' DPOptimizer only, got {type(optimizer).__name__}: "
            "use flat clipping, hooks mode and one process"
        )
    if not isinstance(loader, DPDataLoader) or loader.distributed:
        raise TypeError(
            f"secure mode needs a single-process DPDataLoader, got {type(loader).__name__}: "
            "call make_private with poisson_sampling=True"
        )
    secure = SecureDPOptimizer(
        optimizer.original_optimizer,
        noise_multiplier=optimizer.noise_multiplier,
        max_grad_norm=optimizer.max_grad_norm,
        expected_batch_size=optimizer.expected_batch_size,
        loss_reduction=optimizer.loss_reduction,
    )
    if optimizer.step_hook is not None:
        secure.attach_step_hook(optimizer.step_hook)
    return secure, secure_poisson_loader(loader)
