"""Uniform and Gaussian samples from the operating system's CSPRNG, for DP-SGD secure mode.

Every draw reads fresh bytes from ``os.urandom`` (``getrandom(2)`` on Linux), so draws cannot
be seeded or replayed. Opacus 1.6 takes its secure randomness from the ``torchcsprng``
package instead, which has no build for Python 3.11 and current torch releases.

Floating-point attacks: a Gaussian or Laplace sample computed in floating point does not
reach every float near the true value with the right probability, so the low-order bits of
``value + noise`` can reveal ``value``. I. Mironov showed this for the Laplace mechanism
("On Significance of the Least Significant Bits for Differential Privacy", CCS 2012), and
J. Jin et al. for Gaussian noise in Opacus and other libraries ("Are We There Yet? Timing
and Floating-Point Attacks on Differential Privacy Systems", IEEE S&P 2022,
arXiv:2112.05307). :func:`gaussian` applies the mitigation of N. Holohan and S. Braghin
("Secure Random Sampling in Differential Privacy", ESORICS 2021, arXiv:2107.10138, §5.1):
a sample of N(0, σ²) is the sum of 2n independent samples of N(0, σ²/(2n)). Like Opacus'
secure mode (``opacus.optimizers.optimizer._generate_noise``) it uses n = 2, which by the
estimate in that function's docstring raises the attack's cost from about 2^53 to 2^159.
"""

from __future__ import annotations

import math
import os

import numpy as np

UNIFORM_BITS = 53  # the float64 significand: every multiple of 2**-53 in [0, 1) is exact
HARDENING_N = 2  # n in Holohan and Braghin's sum of 2n Gaussian samples


def _check_size(size: int) -> None:
    if size < 0:
        raise ValueError(f"invalid sample size {size}: expected an integer >= 0")


def uniform(size: int) -> np.ndarray:
    """Draw ``size`` uniform float64 values in [0, 1), each a multiple of 2**-53."""
    _check_size(size)
    words = np.frombuffer(os.urandom(8 * size), dtype=np.uint64)
    # The top 53 of 64 random bits, as an integer below 2**53, convert to float64 exactly.
    return (words >> np.uint64(64 - UNIFORM_BITS)).astype(np.float64) * 2.0**-UNIFORM_BITS


def standard_normal(size: int) -> np.ndarray:
    """Draw ``size`` samples of N(0, 1) in float64 with the Box-Muller transform.

    Each pair of uniforms (u1, u2) gives R·cos(θ) and R·sin(θ) with R = sqrt(-2 ln(1 - u1))
    and θ = 2π·u2. The cosine fills the first half of the result and the sine the second,
    so two entries share uniforms only when they are ``(size + 1) // 2`` apart. Because
    1 - u1 >= 2**-53, |sample| <= sqrt(106 ln 2) ≈ 8.57: the tails beyond that have
    probability below 1e-17 and are cut off.
    """
    _check_size(size)
    pairs = (size + 1) // 2
    uniforms = uniform(2 * pairs)
    radius = np.sqrt(-2.0 * np.log1p(-uniforms[:pairs]))
    angle = (2.0 * math.pi) * uniforms[pairs:]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size]


def gaussian(size: int, std: float) -> np.ndarray:
    """Draw ``size`` samples of N(0, ``std``²) in float64, hardened against float attacks.

    Each sample is (std / sqrt(2n)) times a sum of 2n = 4 standard normal samples. The
    summands of one sample come from separate :func:`standard_normal` calls, so they never
    share a Box-Muller pair. That matters because the cosine and sine outputs of one pair
    sum to sqrt(2)·R·cos(θ - π/4), a single Gaussian sample, which would undo the hardening.
    """
    _check_size(size)
    if not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"invalid standard deviation {std}: expected a finite number >= 0")
    summands = 2 * HARDENING_N
    total = np.zeros(size, dtype=np.float64)
    for _ in range(summands):
        total += standard_normal(size)
    return total * (std / math.sqrt(summands))
