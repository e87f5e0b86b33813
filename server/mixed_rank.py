"""Aggregation of LoRA adapters with different ranks: product-space averaging, SVD re-projection.

Averaging ``lora_A`` and ``lora_B`` separately does not average the updates
``ΔW_i = s_i B_i A_i`` (``s_i = lora_alpha / r_i``), and is impossible without padding when
ranks differ. This module averages in the space of full matrices instead:

1. ``ΔW = Σ_i w_i s_i B_i A_i / Σ_i w_i`` per LoRA module (:func:`aggregate_delta_weights`).
   FLoRA (Z. Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
   Heterogeneous Low-Rank Adaptations", NeurIPS 2024, arXiv:2409.05976) shows that stacking
   the clients' scaled ``B_i`` column-wise and ``A_i`` row-wise gives a product equal to
   ``Σ_i ΔW_i``, so this average has no aggregation error.
2. Each client receives the best approximation of ``ΔW`` at its own rank, from a truncated
   SVD (:func:`project_to_rank`, :func:`project_to_client_ranks`). Averaging full-size
   LoRA weights and redistributing them by SVD is FlexLoRA (J. Bai et al., "Federated
   Fine-tuning of Large Language Models under Heterogeneous Tasks and Client Resources",
   NeurIPS 2024, arXiv:2402.11505). By the Eckart–Young theorem the truncation error in
   Frobenius norm is the root sum of squares of the discarded singular values
   (:func:`truncation_error`).

HetLoRA (Y. J. Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024, arXiv:2401.06432) differs: it zero-pads the factors to the
maximum rank, averages ``A`` and ``B`` with sparsity-based weights and truncates the global
factors to each client's rank. It is not implemented here.

Each client therefore receives an adapter of its own rank: ``lora_A`` of shape
``(r_client, in_features)`` and ``lora_B`` of shape ``(out_features, r_client)``.

NOTE: only ``lora_A``/``lora_B`` pairs of linear layers are handled. Other adapter tensors
(``modules_to_save`` heads, ``lora_embedding_A``/``lora_embedding_B``, DoRA magnitude
vectors) are ignored by :func:`lora_pairs` and must be averaged separately, e.g. with
:func:`server.robust.weighted_mean`.

NOTE: ``ΔW`` is a dense ``(out_features, in_features)`` float64 matrix per module and the
SVD costs ``O(out · in · min(out, in))``. That is small for MiniLM (384 × 1536 at most) but
grows to gigabytes for 7B-parameter models. There, the SVD of ``[B_1 … B_n] [A_1; …; A_n]``
can be computed from QR factors of the stacked factors without forming ``ΔW``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "DEFAULT_KEY_FORMAT",
    "aggregate_delta_weights",
    "delta_weights",
    "lora_pairs",
    "project_to_client_ranks",
    "project_to_rank",
    "truncation_error",
]

# PEFT state-dict names, as returned by get_peft_model_state_dict ("<module>.lora_A.weight")
# or by model.state_dict() with the adapter name ("<module>.lora_A.default.weight").
_LORA_KEY = re.compile(r"^(?P<prefix>.+)\.lora_(?P<matrix>[AB])(?:\.[^.]+)?\.weight$")

DEFAULT_KEY_FORMAT = "{prefix}.lora_{matrix}.weight"


# ---------------------------------------------------------------------------
# Reading adapters
# ---------------------------------------------------------------------------


def lora_pairs(tensors: Mapping[str, np.ndarray]) -> dict[str, tuple[str, str]]:
    """Map each LoRA module prefix to its ``(lora_A key, lora_B key)``, sorted by prefix.

    For ``"base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"`` the
    prefix is ``"base_model.model.bert.encoder.layer.0.attention.self.query"``. Keys that
    are not ``lora_A``/``lora_B`` weights are ignored.

    Raises
    ------
    ValueError
        If a module has ``lora_A`` without ``lora_B`` (or the reverse), or two keys of the
        same matrix (e.g. two adapter names).
    """
    found: dict[str, dict[str, str]] = {}
    for key in tensors:
        match = _LORA_KEY.match(key)
        if match is None:
            continue
        matrices = found.setdefault(match["prefix"], {})
        matrix = match["matrix"]
        if matrix in matrices:
            raise ValueError(
                f"module {match['prefix']!r} has two lora_{matrix} tensors: "
                f"{matrices[matrix]!r} and {key!r}. Pass the tensors of one adapter only."
            )
        matrices[matrix] = key

    pairs = {}
    for prefix in sorted(found):
        matrices = found[prefix]
        if "A" not in matrices or "B" not in matrices:
            present, absent = ("A", "B") if "A" in matrices else ("B", "A")
            raise ValueError(
                f"module {prefix!r} has lora_{present} ({matrices[present]!r}) but no "
                f"lora_{absent}. Every LoRA module needs both matrices."
            )
        pairs[prefix] = (matrices["A"], matrices["B"])
    return pairs


def _factors(
    tensors: Mapping[str, np.ndarray], key_a: str, key_b: str
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(A, B)`` in float64 after checking shapes (r, in) and (out, r)."""
    lora_a = np.asarray(tensors[key_a], dtype=np.float64)
    lora_b = np.asarray(tensors[key_b], dtype=np.float64)
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(
            f"{key_a!r} has shape {lora_a.shape} and {key_b!r} has shape {lora_b.shape}, "
            "expected (r, in_features) and (out_features, r) with the same r"
        )
    return lora_a, lora_b


def _check_scaling(scaling: float, argument: str) -> None:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"{argument} is {type(scaling).__name__}, expected a float")
    if not math.isfinite(scaling) or scaling <= 0:
        raise ValueError(
            f"{argument}={scaling!r} is invalid, expected lora_alpha / r > 0 "
            "(or lora_alpha / sqrt(r) with rsLoRA)"
        )


def delta_weights(tensors: Mapping[str, np.ndarray], *, scaling: float) -> dict[str, np.ndarray]:
    """Compute ``ΔW = scaling · B @ A`` for every LoRA module, in float64.

    Parameters
    ----------
    tensors : Mapping[str, np.ndarray]
        One client's adapter tensors (PEFT state-dict names).
    scaling : float
        The client's ``lora_alpha / r``. One value applies to every module, so all modules
        must have the same rank: PEFT's per-module ``rank_pattern`` is rejected.

    Returns
    -------
    dict[str, np.ndarray]
        Module prefix to ``ΔW`` of shape ``(out_features, in_features)``.
    """
    _check_scaling(scaling, "scaling")
    pairs = lora_pairs(tensors)
    if not pairs:
        raise ValueError("tensors contain no lora_A/lora_B pair, so there is no ΔW to compute")
    factors = {prefix: _factors(tensors, key_a, key_b) for prefix, (key_a, key_b) in pairs.items()}
    ranks = sorted({lora_a.shape[0] for lora_a, _ in factors.values()})
    if len(ranks) > 1:
        raise ValueError(
            f"modules have different ranks {ranks}, but one scaling applies to every module. "
            "Per-module ranks (PEFT rank_pattern) are not supported."
        )
    # (out, r) @ (r, in) -> (out, in)
    return {prefix: scaling * (lora_b @ lora_a) for prefix, (lora_a, lora_b) in factors.items()}


# ---------------------------------------------------------------------------
# Aggregation in product space
# ---------------------------------------------------------------------------


def aggregate_delta_weights(
    client_tensors: Sequence[Mapping[str, np.ndarray]],
    scalings: Sequence[float],
    weights: Sequence[float],
) -> dict[str, np.ndarray]:
    """Average ``ΔW_i = s_i B_i A_i`` over clients with weights normalised to sum to 1.

    Clients may use different ranks but must adapt the same modules with the same
    ``(out_features, in_features)``. The result is float64, module prefix to ``ΔW``.
    """
    # Argument checks.
    num_clients = len(client_tensors)
    if num_clients == 0:
        raise ValueError("client_tensors is empty. Pass at least one client adapter.")
    if len(scalings) != num_clients or len(weights) != num_clients:
        raise ValueError(
            f"got {num_clients} adapters, {len(scalings)} scalings and {len(weights)} "
            "weights, expected one scaling and one weight per adapter"
        )
    weight_array = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(weight_array)) or np.any(weight_array < 0):
        raise ValueError("weights must be finite and >= 0 (e.g. example counts)")
    total = float(weight_array.sum())
    if total <= 0:
        raise ValueError("weights sum to 0, so no adapter would count. Pass positive weights.")

    # Accumulate one client at a time, so only one ΔW per module is held besides the sum.
    accumulated: dict[str, np.ndarray] = {}
    for index, (tensors, scaling) in enumerate(zip(client_tensors, scalings)):
        deltas = delta_weights(tensors, scaling=scaling)
        if index == 0:
            accumulated = {prefix: np.zeros_like(delta) for prefix, delta in deltas.items()}
        if sorted(deltas) != sorted(accumulated):
            raise ValueError(
                f"client_tensors[{index}] adapts other modules than client_tensors[0]. "
                "All clients must use the same LoRA target modules."
            )
        for prefix, delta in deltas.items():
            if delta.shape != accumulated[prefix].shape:
                raise ValueError(
                    f"client_tensors[{index}] gives module {prefix!r} a ΔW of shape "
                    f"{delta.shape}, but client_tensors[0] gives {accumulated[prefix].shape}"
                )
            accumulated[prefix] += (weight_array[index] / total) * delta
    return accumulated


# ---------------------------------------------------------------------------
# Re-projection to a client's rank
# ---------------------------------------------------------------------------


_Svd = tuple[np.ndarray, np.ndarray, np.ndarray]


def _svd(delta: np.ndarray, name: str) -> _Svd:
    """Return the thin SVD ``(U, S, V^T)`` of a 2-D ``ΔW`` in float64."""
    matrix = np.asarray(delta, dtype=np.float64)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"{name} has shape {matrix.shape}, expected a non-empty 2-D ΔW")
    left, singular, right_t = np.linalg.svd(matrix, full_matrices=False)
    return left, singular, right_t


def _split_svd(svd: _Svd, rank: int, scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """Split the best rank-``rank`` approximation into LoRA factors ``(A, B)``.

    ``scaling · B @ A = U_r S_r V_r^T`` with ``B = U_r sqrt(S_r / scaling)`` and
    ``A = sqrt(S_r / scaling) V_r^T``, so A and B carry equal shares of each singular value.
    """
    left, singular, right_t = svd
    out_features, in_features = left.shape[0], right_t.shape[1]
    num_kept = min(rank, singular.size)
    root = np.sqrt(singular[:num_kept] / scaling)

    lora_b = np.zeros((out_features, rank))
    lora_a = np.zeros((rank, in_features))
    lora_b[:, :num_kept] = left[:, :num_kept] * root  # (out, num_kept)
    lora_a[:num_kept] = root[:, None] * right_t[:num_kept]  # (num_kept, in)

    # Components whose singular value is zero (up to round-off) would get zero rows in A and
    # zero columns in B, and LoRA's gradients never move such a pair off zero. As in PEFT's
    # initialisation (B = 0, A != 0), keep B = 0 there but give A the unit-norm right
    # singular vector, which leaves scaling · B @ A unchanged and lets training use the rank.
    tolerance = singular[0] * max(out_features, in_features) * np.finfo(np.float64).eps
    unused = np.flatnonzero(singular[:num_kept] <= tolerance)
    lora_a[unused] = right_t[unused]
    lora_b[:, unused] = 0.0
    # NOTE: for an all-zero ΔW these rows are the unit vectors e_1 … e_r (NumPy 2.4 returns
    # V = I), so the first round should start from PEFT's random initialisation instead.
    # When rank > min(out_features, in_features), rows beyond min(out, in) stay zero.
    return lora_a, lora_b


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank={rank!r} is invalid, expected an integer >= 1")


def project_to_rank(
    delta_w: Mapping[str, np.ndarray],
    *,
    rank: int,
    scaling: float,
    key_format: str = DEFAULT_KEY_FORMAT,
) -> dict[str, np.ndarray]:
    """Factor every ``ΔW`` into rank-``rank`` LoRA matrices by truncated SVD.

    With ``ΔW ≈ U_r S_r V_r^T``, the factors are ``B = U_r sqrt(S_r) / sqrt(scaling)`` and
    ``A = sqrt(S_r) V_r^T / sqrt(scaling)``, so ``scaling · B @ A`` is the best rank-``rank``
    approximation of ``ΔW`` in Frobenius and spectral norm (Eckart–Young). When ``ΔW`` has
    rank at most ``rank``, it is reconstructed exactly up to round-off. Components with a
    zero singular value get ``B`` columns of zero and unit-norm ``A`` rows, so training can
    still move them.

    Parameters
    ----------
    delta_w : Mapping[str, np.ndarray]
        Module prefix to ``ΔW`` of shape ``(out_features, in_features)``.
    rank : int
        Target LoRA rank ``r``.
    scaling : float
        ``lora_alpha / r`` of the adapter that receives the factors.
    key_format : str, default ``"{prefix}.lora_{matrix}.weight"``
        Format of the output names, with fields ``prefix`` and ``matrix`` (``"A"`` or
        ``"B"``). Use ``"{prefix}.lora_{matrix}.default.weight"`` for names that include the
        adapter name.

    Returns
    -------
    dict[str, np.ndarray]
        float32 ``lora_A`` of shape ``(rank, in_features)`` and ``lora_B`` of shape
        ``(out_features, rank)`` for every module.
    """
    _check_rank(rank)
    _check_scaling(scaling, "scaling")
    result = {}
    for prefix in sorted(delta_w):
        svd = _svd(delta_w[prefix], f"delta_w[{prefix!r}]")
        lora_a, lora_b = _split_svd(svd, rank, scaling)
        result[key_format.format(prefix=prefix, matrix="A")] = lora_a.astype(np.float32)
        result[key_format.format(prefix=prefix, matrix="B")] = lora_b.astype(np.float32)
    return result


def project_to_client_ranks(
    delta_w: Mapping[str, np.ndarray],
    client_tensors: Sequence[Mapping[str, np.ndarray]],
    scalings: Sequence[float],
) -> list[dict[str, np.ndarray]]:
    """Factor the global ``ΔW`` into one adapter per client, at that client's own rank.

    The rank and the tensor names of each client's adapter are read from its
    ``client_tensors`` entry (its last update or the adapter it was sent), so every client
    receives tensors with its own names and shapes. Tensors outside LoRA pairs are not
    included in the result.
    """
    if len(scalings) != len(client_tensors):
        raise ValueError(
            f"got {len(client_tensors)} adapters and {len(scalings)} scalings, "
            "expected one scaling per adapter"
        )
    # One SVD per module, shared by every client.
    svds = {prefix: _svd(delta_w[prefix], f"delta_w[{prefix!r}]") for prefix in sorted(delta_w)}

    adapters = []
    for index, (tensors, scaling) in enumerate(zip(client_tensors, scalings)):
        _check_scaling(scaling, f"scalings[{index}]")
        pairs = lora_pairs(tensors)
        if sorted(pairs) != sorted(delta_w):
            raise ValueError(
                f"client_tensors[{index}] adapts other modules than delta_w. "
                "All clients must use the same LoRA target modules."
            )
        adapter = {}
        for prefix, (key_a, key_b) in pairs.items():
            rank, in_features = np.shape(tensors[key_a])
            out_features = np.shape(tensors[key_b])[0]
            delta_shape = np.shape(delta_w[prefix])
            if delta_shape != (out_features, in_features):
                raise ValueError(
                    f"delta_w[{prefix!r}] has shape {delta_shape}, but client_tensors[{index}] "
                    f"adapts a ({out_features}, {in_features}) weight"
                )
            lora_a, lora_b = _split_svd(svds[prefix], int(rank), scaling)
            adapter[key_a] = lora_a.astype(np.float32)
            adapter[key_b] = lora_b.astype(np.float32)
        adapters.append(adapter)
    return adapters


def truncation_error(delta_w: Mapping[str, np.ndarray], *, rank: int) -> float:
    """Compute the relative Frobenius error of approximating every ``ΔW`` at ``rank``.

    Returns ``sqrt(Σ discarded σ²) / sqrt(Σ σ²)`` over all modules (Eckart–Young), or 0.0
    when every ``ΔW`` is zero. Useful as a per-round metric of what a rank-``rank`` client
    loses from the global update.
    """
    _check_rank(rank)
    discarded = 0.0
    total = 0.0
    for prefix in sorted(delta_w):
        matrix = np.asarray(delta_w[prefix], dtype=np.float64)
        if matrix.ndim != 2:
            raise ValueError(f"delta_w[{prefix!r}] has shape {matrix.shape}, expected 2-D")
        singular = np.linalg.svd(matrix, compute_uv=False)
        total += float(np.sum(singular**2))
        discarded += float(np.sum(singular[rank:] ** 2))
    return math.sqrt(discarded / total) if total > 0 else 0.0
