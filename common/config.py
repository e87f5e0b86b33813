"""Run configuration: TOML with kebab-case keys, parsed once into frozen dataclasses."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from common.secagg.fixed_point import MAX_MODULUS_BITS, MIN_MODULUS_BITS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ACCOUNTANTS = ("prv", "rdp")
PARTITIONERS = ("column", "iid", "dirichlet")
OPTIMIZERS = ("adamw", "sgd")
PII_KINDS = ("email", "phone", "card", "url")
# Above about this ε, the discretisation in Opacus' PRV accountant (1.6) fails or loses
# accuracy for many sample rates and step counts, so RDP composes ε there instead.
PRV_MAX_EPSILON = 10.0


class ConfigError(ValueError):
    """Invalid run configuration; the message names the key, the value and the fix."""


def _require(condition: bool, key: str, value: object, expected: str) -> None:
    if not condition:
        raise ConfigError(f"invalid {key} = {value!r}: expected {expected}")


@dataclass(frozen=True)
class ModelConfig:
    """Base model and LoRA adapter settings.

    ``name`` is an alias (``minilm-l6``), a local folder or a Hugging Face hub id.
    The adapter update is ``scaling * B @ A`` with ``scaling = lora_alpha / lora_r``.

    ``ffa_lora`` freezes every ``lora_A`` at its seeded initialization (the same
    ``seed`` on the server and every client) and trains and sends only ``lora_B``
    (FFA-LoRA: Y. Sun et al., "Improving LoRA in Privacy-preserving Federated Learning",
    ICLR 2024). ``client_ranks`` (e.g. ``"4,8,16"``) gives clients different LoRA ranks,
    assigned round-robin by partition id unless a node config sets ``lora-rank``. The
    server then aggregates in the space of ``ΔW = scaling * B @ A`` (FlexLoRA) and keeps
    its global adapter at the largest rank. ``lora_r`` is the rank when ``client_ranks``
    is empty. The two options cannot be combined, because FlexLoRA's SVD re-projection
    changes ``lora_A`` every round.
    """

    name: str = "minilm-l6"
    lora_r: int = 4
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    max_length: int = 192
    train_head: bool = False
    max_new_tokens: int = 64
    ffa_lora: bool = False
    client_ranks: str = ""

    def __post_init__(self) -> None:
        _require(bool(self.name), "model.name", self.name, "a model alias, folder or hub id")
        _require(self.lora_r >= 1, "model.lora-r", self.lora_r, "an integer >= 1")
        _require(
            _parse_ranks(self.client_ranks) is not None,
            "model.client-ranks",
            self.client_ranks,
            'comma-separated integers >= 1, e.g. "4,8,16" (empty: every client uses lora-r)',
        )
        _require(
            not (self.ffa_lora and self.rank_list),
            "model.ffa-lora",
            self.ffa_lora,
            "false when model.client-ranks is set (FFA-LoRA keeps lora_A frozen, FlexLoRA "
            "re-projects it): drop one of the two",
        )
        _require(self.lora_alpha > 0, "model.lora-alpha", self.lora_alpha, "a number > 0")
        _require(
            0.0 <= self.lora_dropout < 1.0, "model.lora-dropout", self.lora_dropout, "0 <= p < 1"
        )
        _require(self.max_length >= 8, "model.max-length", self.max_length, "an integer >= 8")
        _require(
            self.max_new_tokens >= 1, "model.max-new-tokens", self.max_new_tokens, "an integer >= 1"
        )

    @property
    def rank_list(self) -> tuple[int, ...]:
        """Client ranks from ``client_ranks``; empty when every client uses ``lora_r``."""
        return _parse_ranks(self.client_ranks) or ()

    @property
    def max_rank(self) -> int:
        """Rank of the server's global adapter: the largest client rank, else ``lora_r``."""
        return max(self.rank_list, default=self.lora_r)


def _parse_ranks(text: str) -> tuple[int, ...] | None:
    """Parse ``"4,8,16"`` into ``(4, 8, 16)``; ``None`` when the text is invalid."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not all(part.isdigit() and int(part) >= 1 for part in parts):
        return None
    return tuple(int(part) for part in parts)


@dataclass(frozen=True)
class DataConfig:
    """Where the records come from and how they are split among advertisers.

    ``dataset = "e2e"`` reads ``train-file`` from the E2E folder under ``data-dir``
    (downloading ``devset.csv`` when it is missing); ``dataset = "records"`` reads a JSONL
    or CSV file with the named source and text columns.

    ``canary_repeats > 0`` plants ``canary_secret`` as the text of that many extra records
    in partition ``canary_client``, for a memorisation audit (``fedads audit``).

    ``attack_client >= 0`` makes the simulated client of that partition id hostile, for
    robustness tests and benchmarks (``python -m simulations.benchmark --only attack``):
    after training it replies ``sent + attack_scale * (trained - sent)``, its update
    scaled by ``attack_scale``, instead of ``trained`` (:func:`client.app.attack_update`).
    Under secure aggregation the client still clips the scaled update like an honest one.
    The default -1 turns the attack off. It is a test tool, not a deployment setting.
    """

    data_dir: str = "data"
    dataset: str = "e2e"
    train_file: str = "devset.csv"
    source_column: str = "source"
    text_column: str = "text"
    max_chars: int = 2000
    partitioner: str = "column"
    partition_column: str = "name"
    num_clients: int = 20
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.1
    max_examples_per_client: int = 0
    eval_sample: int = 24
    canary_client: int = 0
    canary_repeats: int = 0
    canary_secret: str = ""
    attack_client: int = -1
    attack_scale: float = 100.0

    def __post_init__(self) -> None:
        _require(self.dataset in ("e2e", "records"), "data.dataset", self.dataset, "e2e or records")
        _require(
            self.partitioner in PARTITIONERS,
            "data.partitioner",
            self.partitioner,
            " or ".join(PARTITIONERS),
        )
        _require(self.num_clients >= 1, "data.num-clients", self.num_clients, "an integer >= 1")
        _require(self.dirichlet_alpha > 0, "data.dirichlet-alpha", self.dirichlet_alpha, "> 0")
        _require(
            0.0 < self.test_fraction < 1.0, "data.test-fraction", self.test_fraction, "0 < f < 1"
        )
        _require(
            self.max_examples_per_client >= 0,
            "data.max-examples-per-client",
            self.max_examples_per_client,
            "an integer >= 0 (0 means no limit)",
        )
        _require(self.eval_sample >= 1, "data.eval-sample", self.eval_sample, "an integer >= 1")
        _require(self.max_chars >= 1, "data.max-chars", self.max_chars, "an integer >= 1")
        _require(self.canary_client >= 0, "data.canary-client", self.canary_client, ">= 0")
        _require(
            self.canary_repeats >= 0,
            "data.canary-repeats",
            self.canary_repeats,
            "an integer >= 0 (0 plants no canary)",
        )
        _require(
            self.canary_repeats == 0 or bool(self.canary_secret.strip()),
            "data.canary-secret",
            self.canary_secret,
            "a non-empty text when data.canary-repeats > 0",
        )
        _require(
            -1 <= self.attack_client < self.num_clients,
            "data.attack-client",
            self.attack_client,
            f"-1 (no hostile client) or a partition id from 0 to {self.num_clients - 1} "
            "(data.num-clients - 1)",
        )
        _require(
            math.isfinite(self.attack_scale),
            "data.attack-scale",
            self.attack_scale,
            "a finite number (the factor the hostile client multiplies its update by, e.g. 100)",
        )


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client, with a fresh optimizer every round.

    ``optimizer`` is ``adamw`` or ``sgd`` (with ``momentum``). Under DP-SGD, plain SGD
    moves each coordinate by the noisy gradient itself, while AdamW rescales every
    coordinate to a step of about ``learning_rate`` whatever its signal-to-noise ratio, so
    the noise-dominated coordinates random-walk.

    ``head_learning_rate`` (0: ``learning_rate``) applies to the trained LM head transform
    (``model.train-head``). Its full 384 x 384 matrix multiplies every output, so under
    DP-SGD it tolerates far less noise per coordinate than the low-rank LoRA factors.
    """

    local_epochs: float = 0.5
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    momentum: float = 0.0
    head_learning_rate: float = 0.0

    def __post_init__(self) -> None:
        _require(self.local_epochs > 0, "train.local-epochs", self.local_epochs, "a number > 0")
        _require(self.batch_size >= 1, "train.batch-size", self.batch_size, "an integer >= 1")
        _require(self.learning_rate > 0, "train.learning-rate", self.learning_rate, "a number > 0")
        _require(self.weight_decay >= 0, "train.weight-decay", self.weight_decay, ">= 0")
        _require(
            self.optimizer in OPTIMIZERS, "train.optimizer", self.optimizer, " or ".join(OPTIMIZERS)
        )
        _require(0 <= self.momentum < 1, "train.momentum", self.momentum, "0 <= momentum < 1")
        _require(
            self.head_learning_rate >= 0,
            "train.head-learning-rate",
            self.head_learning_rate,
            "a number >= 0 (0: train.learning-rate)",
        )


@dataclass(frozen=True)
class PrivacyConfig:
    """Record-level DP-SGD at each advertiser (Opacus).

    ``target_epsilon`` and ``target_delta`` are each client's budget for the whole run,
    composed over every round it takes part in. ``clipping_norm`` bounds each record's
    gradient (L2). ``accountant`` is ``"prv"`` or ``"rdp"``; a PRV request with
    ``target_epsilon`` above ``PRV_MAX_EPSILON`` is served by RDP (see
    :attr:`accountant_in_use`). ``secure_mode`` draws the DP noise and the Poisson samples
    from the operating system's CSPRNG (``common.secure_rng``) and is forced on when
    ``production`` is true.

    ``scrub_pii`` replaces the PII kinds listed in ``scrub_kinds`` (comma-separated subset
    of ``PII_KINDS``) in each client's records before tokenization. The replacement counts
    stay in the client's log, unless ``report_pii_counts`` sends their total to the server,
    where it is not covered by DP.

    ``planned_rounds`` is the number of rounds each client's noise is calibrated for
    (0: every round of the run). With ``server.fraction-train < 1`` a client joins only some
    rounds, so planning for all of them would add more noise than needed; a client sampled
    more often than planned declines the rounds that would pass its budget.
    """

    dp: bool = True
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    clipping_norm: float = 1.0
    accountant: str = "prv"
    secure_mode: bool = False
    production: bool = False
    ledger_dir: str = ""
    scrub_pii: bool = True
    scrub_kinds: str = "email,phone,card,url"
    report_pii_counts: bool = False
    planned_rounds: int = 0

    def __post_init__(self) -> None:
        _require(
            self.planned_rounds >= 0,
            "privacy.planned-rounds",
            self.planned_rounds,
            "an integer >= 0 (0: every round of the run)",
        )
        _require(
            self.target_epsilon > 0 and math.isfinite(self.target_epsilon),
            "privacy.target-epsilon",
            self.target_epsilon,
            "a finite number > 0",
        )
        _require(
            0 < self.target_delta < 1, "privacy.target-delta", self.target_delta, "0 < delta < 1"
        )
        _require(self.clipping_norm > 0, "privacy.clipping-norm", self.clipping_norm, "> 0")
        _require(
            self.accountant in ACCOUNTANTS,
            "privacy.accountant",
            self.accountant,
            " or ".join(ACCOUNTANTS),
        )
        kinds = [kind.strip() for kind in self.scrub_kinds.split(",") if kind.strip()]
        _require(
            all(kind in PII_KINDS for kind in kinds) and (bool(kinds) or not self.scrub_pii),
            "privacy.scrub-kinds",
            self.scrub_kinds,
            f"a comma-separated subset of {','.join(PII_KINDS)} (set privacy.scrub-pii = false "
            "to scrub nothing)",
        )
        if self.production and not self.secure_mode:
            object.__setattr__(self, "secure_mode", True)

    @property
    def accountant_in_use(self) -> str:
        """Accountant that composes ε: ``rdp`` replaces ``prv`` above ``PRV_MAX_EPSILON``."""
        if self.accountant == "prv" and self.target_epsilon > PRV_MAX_EPSILON:
            return "rdp"
        return self.accountant

    @property
    def scrub_kind_set(self) -> frozenset[str]:
        """PII kinds to replace, empty when ``scrub_pii`` is off."""
        if not self.scrub_pii:
            return frozenset()
        return frozenset(kind.strip() for kind in self.scrub_kinds.split(",") if kind.strip())


@dataclass(frozen=True)
class AdvertiserDPConfig:
    """Advertiser-level DP on the server (DP-FedAvg), the ``[advertiser-dp]`` table.

    When ``enabled``, the server clips each client's whole update (its delta from the
    adapter it was sent) to L2 norm ``clipping_norm`` and adds Gaussian noise of standard
    deviation ``z * C / m`` to the mean of the ``m`` sampled clients' clipped updates
    (:mod:`server.central_dp`). The unit of privacy is the advertiser: the (ε, δ) guarantee
    covers all of one advertiser's data, over every round of the run. It composes with
    record-level DP-SGD in ``[privacy]``, which clients still run when ``privacy.dp`` is on.

    Set exactly one of ``noise_multiplier`` (``z``, ε is then reported) and
    ``target_epsilon`` (``z`` is then calibrated so that ``server.num-rounds`` rounds at
    sample rate ``q = sampled / data.num-clients`` spend ``target_epsilon`` at
    ``target_delta``). ``accountant`` composes the rounds (``rdp`` or ``prv``).

    ``adaptive_clipping`` starts at ``clipping_norm`` and moves the norm towards the
    ``target_quantile`` of the update norms after every round,
    ``C <- C * exp(-clip_learning_rate * (b - target_quantile))``, where ``b`` is the noised
    fraction of updates with norm <= C. The count behind ``b`` gets Gaussian noise of
    standard deviation ``clipped_count_stddev`` (0: expected sampled clients / 20, the value
    Andrew et al. recommend), and the update noise is raised so that the two releases
    together spend what one Gaussian mechanism with multiplier ``z`` would.

    The mean divides by the number of sampled clients with equal weights, so
    ``server.weighting`` must be ``uniform``: example-count weights would let a client's
    share, and with it the sensitivity, depend on the counts clients report. For the same
    reason ``server.robust`` must be ``none`` (the median and trimmed mean have no
    sensitivity of ``C / m``) and ``server.norm-bound`` must be 0 (the clipping replaces
    it). :class:`RunConfig` raises :class:`ConfigError` for each of these.

    With ``server.secure-aggregation`` on as well, the noise is distributed
    (:mod:`server.central_dp`, "Distributed mode"): each client clips its update to the
    round's ``C``, sends it with weight 1 and adds its own share of the noise before
    masking, and the server adds none. ``server.max-update-norm`` must then be 0, because
    the server cannot reject an update it never receives in the clear.
    """

    enabled: bool = False
    clipping_norm: float = 1.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    target_delta: float = 1e-5
    accountant: str = "rdp"
    adaptive_clipping: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float = 0.0

    def __post_init__(self) -> None:
        _require(
            self.clipping_norm > 0 and math.isfinite(self.clipping_norm),
            "advertiser-dp.clipping-norm",
            self.clipping_norm,
            "a finite number > 0 (the initial norm when adaptive-clipping is on)",
        )
        _require(
            self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier),
            "advertiser-dp.noise-multiplier",
            self.noise_multiplier,
            "a finite number >= 0 (0: calibrate it from advertiser-dp.target-epsilon)",
        )
        _require(
            self.target_epsilon >= 0 and math.isfinite(self.target_epsilon),
            "advertiser-dp.target-epsilon",
            self.target_epsilon,
            "a finite number >= 0 (0: report the epsilon of advertiser-dp.noise-multiplier)",
        )
        _require(
            not self.enabled or (self.noise_multiplier > 0) != (self.target_epsilon > 0),
            "advertiser-dp.noise-multiplier",
            self.noise_multiplier,
            "a number > 0 with advertiser-dp.target-epsilon = 0, or 0 with "
            f"advertiser-dp.target-epsilon > 0 (it is {self.target_epsilon!r}): set exactly "
            "one of the two",
        )
        _require(
            0 < self.target_delta < 1,
            "advertiser-dp.target-delta",
            self.target_delta,
            "0 < delta < 1, well below 1 / number of advertisers",
        )
        _require(
            self.accountant in ACCOUNTANTS,
            "advertiser-dp.accountant",
            self.accountant,
            " or ".join(ACCOUNTANTS),
        )
        _require(
            0.0 < self.target_quantile < 1.0,
            "advertiser-dp.target-quantile",
            self.target_quantile,
            "0 < quantile < 1 (the fraction of updates left unclipped, e.g. 0.5)",
        )
        _require(
            self.clip_learning_rate > 0 and math.isfinite(self.clip_learning_rate),
            "advertiser-dp.clip-learning-rate",
            self.clip_learning_rate,
            "a finite number > 0 (e.g. 0.2)",
        )
        _require(
            self.clipped_count_stddev >= 0 and math.isfinite(self.clipped_count_stddev),
            "advertiser-dp.clipped-count-stddev",
            self.clipped_count_stddev,
            "a finite number >= 0 (0: expected sampled clients / 20)",
        )

    @property
    def accountant_in_use(self) -> str:
        """Accountant that composes ε: ``rdp`` replaces ``prv`` above ``PRV_MAX_EPSILON``."""
        if self.accountant == "prv" and self.target_epsilon > PRV_MAX_EPSILON:
            return "rdp"
        return self.accountant


@dataclass(frozen=True)
class WarmStartConfig:
    """Non-private fine-tuning of the initial global adapter on public data, before round 1.

    DP fine-tuning works when the starting model already does the task roughly and the
    private data only adapts it (Li et al., "Large Language Models Can Be Strong
    Differentially Private Learners", ICLR 2022). MiniLM is an encoder, not a language
    model, so before round 1 the server trains the adapter on ``file``: records it may use
    without protection, in the format of ``data.dataset`` and read from ``data.data-dir``
    unless the path is absolute. AdamW at ``learning_rate``, batches of ``batch_size``,
    ``epochs`` passes, at most ``max_examples`` records (0: all).

    No advertiser record takes part, so neither DP guarantee changes; the public records
    themselves get no protection. ``file = ""`` turns the warm start off.
    """

    file: str = ""
    epochs: float = 1.0
    batch_size: int = 16
    learning_rate: float = 3e-3
    max_examples: int = 0

    def __post_init__(self) -> None:
        _require(self.epochs > 0, "warm-start.epochs", self.epochs, "a number > 0")
        _require(
            self.batch_size >= 1, "warm-start.batch-size", self.batch_size, "an integer >= 1"
        )
        _require(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            "warm-start.learning-rate",
            self.learning_rate,
            "a finite number > 0",
        )
        _require(
            self.max_examples >= 0,
            "warm-start.max-examples",
            self.max_examples,
            "an integer >= 0 (0: every record of warm-start.file)",
        )

    @property
    def enabled(self) -> bool:
        return bool(self.file)


STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad")
WEIGHTINGS = ("examples", "uniform")
ROBUST_RULES = ("none", "median", "trimmed-mean")
WIRE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ServerConfig:
    """Rounds, client sampling, aggregation and server-side evaluation.

    ``strategy`` picks the server update (``server.strategies``): ``fedavg``, ``fedavgm``
    (FedAvg with momentum ``server_momentum`` and learning rate ``server_learning_rate``,
    about 1.0 for it), ``fedprox`` (clients add ``proximal_mu / 2 * ||w - w_global||^2``
    to each sample's loss), ``fedadam``, ``fedyogi`` or ``fedadagrad`` (server optimizers
    with learning rate ``server_learning_rate``, momentum ``beta_1``, second moment
    ``beta_2`` and adaptivity ``tau``). ``weighting`` weighs client updates by example count or
    equally. ``robust`` replaces the weighted mean by the coordinate-wise ``median`` or
    ``trimmed-mean`` (dropping ``trim_fraction`` at each end), which ignore weights.
    ``norm_bound > 0`` scales each client's update down to that L2 norm before
    aggregation. Updates whose L2 distance from the adapter they were sent exceeds
    ``max_update_norm``, or whose tensor data exceeds ``max_payload_bytes``, are rejected
    (0 turns either check off). ``round_timeout`` (seconds) ends a round with the replies
    received so far; the round aggregates when at least ``min_train_nodes`` updates are
    valid. ``wire_dtype`` is the dtype of adapter tensors in both directions: ``float16``
    and ``bfloat16`` halve the bytes of ``float32``, and aggregation runs in float32.

    ``secure_aggregation`` runs each training round as a SecAgg+ session
    (:mod:`server.secure_round`), so the server receives only masked updates and their
    sum. Each client clips its own update to :attr:`client_clip_norm` (the smaller of
    the positive ``norm_bound`` and ``max_update_norm``, one of which must be set unless
    advertiser-level DP sets the norm), because the server cannot check one update, and
    ``robust`` must be ``none``.
    Unmasking needs ``ceil(secagg_threshold_fraction * h)`` (at least 2) of each
    client's ``h`` share holders: its ``secagg_num_neighbours`` neighbours (0: every
    other sampled client) and itself. Sums are taken mod ``2**secagg_modulus_bits``.
    With ``weighting = "examples"`` a client sends its example count, capped at
    ``secagg_max_weight``, as its weight; larger caps cost fixed-point precision.
    """

    num_rounds: int = 4
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 3600.0
    eval_every: int = 2
    strategy: str = "fedavg"
    weighting: str = "examples"
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    server_momentum: float = 0.9
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    robust: str = "none"
    trim_fraction: float = 0.1
    norm_bound: float = 0.0
    max_update_norm: float = 0.0
    max_payload_bytes: int = 0
    wire_dtype: str = "float32"
    secure_aggregation: bool = False
    secagg_threshold_fraction: float = 0.6
    secagg_num_neighbours: int = 0
    secagg_modulus_bits: int = 64
    secagg_max_weight: int = 100_000

    def __post_init__(self) -> None:
        _require(self.num_rounds >= 1, "server.num-rounds", self.num_rounds, "an integer >= 1")
        _require(
            0.0 < self.fraction_train <= 1.0,
            "server.fraction-train",
            self.fraction_train,
            "0 < f <= 1",
        )
        _require(
            0.0 <= self.fraction_evaluate <= 1.0,
            "server.fraction-evaluate",
            self.fraction_evaluate,
            "0 <= f <= 1",
        )
        _require(self.min_train_nodes >= 1, "server.min-train-nodes", self.min_train_nodes, ">= 1")
        _require(
            self.min_available_nodes >= 1,
            "server.min-available-nodes",
            self.min_available_nodes,
            ">= 1",
        )
        _require(self.round_timeout > 0, "server.round-timeout", self.round_timeout, "> 0")
        _require(self.eval_every >= 0, "server.eval-every", self.eval_every, ">= 0 (0: never)")
        _require(
            self.strategy in STRATEGIES, "server.strategy", self.strategy, " or ".join(STRATEGIES)
        )
        _require(
            self.weighting in WEIGHTINGS,
            "server.weighting",
            self.weighting,
            " or ".join(WEIGHTINGS),
        )
        _require(self.proximal_mu >= 0, "server.proximal-mu", self.proximal_mu, ">= 0")
        _require(
            self.server_learning_rate > 0,
            "server.server-learning-rate",
            self.server_learning_rate,
            "a number > 0",
        )
        _require(
            0.0 <= self.server_momentum < 1.0,
            "server.server-momentum",
            self.server_momentum,
            "0 <= momentum < 1",
        )
        _require(0.0 <= self.beta_1 < 1.0, "server.beta-1", self.beta_1, "0 <= beta < 1")
        _require(0.0 <= self.beta_2 < 1.0, "server.beta-2", self.beta_2, "0 <= beta < 1")
        _require(self.tau > 0, "server.tau", self.tau, "a number > 0")
        _require(
            self.robust in ROBUST_RULES, "server.robust", self.robust, " or ".join(ROBUST_RULES)
        )
        _require(
            0.0 <= self.trim_fraction < 0.5,
            "server.trim-fraction",
            self.trim_fraction,
            "0 <= f < 0.5 (fraction dropped at each end)",
        )
        _require(self.norm_bound >= 0, "server.norm-bound", self.norm_bound, ">= 0 (0: off)")
        _require(
            self.max_update_norm >= 0,
            "server.max-update-norm",
            self.max_update_norm,
            ">= 0 (0: off)",
        )
        _require(
            self.max_payload_bytes >= 0,
            "server.max-payload-bytes",
            self.max_payload_bytes,
            ">= 0 (0: off)",
        )
        _require(
            self.wire_dtype in WIRE_DTYPES,
            "server.wire-dtype",
            self.wire_dtype,
            " or ".join(WIRE_DTYPES),
        )
        self._check_secure_aggregation()

    def _check_secure_aggregation(self) -> None:
        _require(
            0.5 < self.secagg_threshold_fraction <= 1.0,
            "server.secagg-threshold-fraction",
            self.secagg_threshold_fraction,
            "0.5 < f <= 1 (more than half of each client's share holders must take part in "
            "unmasking, or two disjoint groups could reveal both of a client's secrets)",
        )
        _require(
            self.secagg_num_neighbours == 0
            or (self.secagg_num_neighbours >= 2 and self.secagg_num_neighbours % 2 == 0),
            "server.secagg-num-neighbours",
            self.secagg_num_neighbours,
            "0 (every pair of sampled clients) or an even integer >= 2",
        )
        _require(
            MIN_MODULUS_BITS <= self.secagg_modulus_bits <= MAX_MODULUS_BITS,
            "server.secagg-modulus-bits",
            self.secagg_modulus_bits,
            f"an integer from {MIN_MODULUS_BITS} to {MAX_MODULUS_BITS} (64 is the default)",
        )
        _require(
            self.secagg_max_weight >= 1,
            "server.secagg-max-weight",
            self.secagg_max_weight,
            "an integer >= 1 (the largest example count a client's weight may carry)",
        )
        if not self.secure_aggregation:
            return
        _require(
            self.robust == "none",
            "server.robust",
            self.robust,
            "none when server.secure-aggregation = true: median and trimmed mean need every "
            "update in the clear, and secure aggregation reveals only their sum",
        )
        _require(
            self.min_train_nodes >= 2,
            "server.min-train-nodes",
            self.min_train_nodes,
            ">= 2 when server.secure-aggregation = true (a sum of one update is that update)",
        )

    @property
    def client_clip_norm(self) -> float:
        """L2 bound each client clips its update to under secure aggregation; 0 when unset.

        The smaller of the positive ``norm_bound`` and ``max_update_norm``: the server
        would scale an update down to the first and reject one above the second.
        """
        bounds = [bound for bound in (self.norm_bound, self.max_update_norm) if bound > 0]
        return min(bounds, default=0.0)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Return the tables of the TOML file at ``path``, or raise ConfigError naming it."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"invalid TOML in {path}: {err}") from None


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; sections map to TOML tables with kebab-case keys."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    advertiser_dp: AdvertiserDPConfig = field(default_factory=AdvertiserDPConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    seed: int = 0
    output: str = ""

    def __post_init__(self) -> None:
        _require(
            not (self.server.secure_aggregation and self.model.rank_list),
            "server.secure-aggregation",
            self.server.secure_aggregation,
            "false when model.client-ranks is set: clients of different ranks send tensors "
            "of different shapes, which cannot be summed under one mask; use one model.lora-r",
        )
        if self.server.secure_aggregation and not self.advertiser_dp.enabled:
            _require(
                self.server.client_clip_norm > 0,
                "server.secure-aggregation",
                self.server.secure_aggregation,
                "server.norm-bound > 0 or server.max-update-norm > 0 with it (or "
                "advertiser-dp.enabled = true), because each client clips its own update to "
                "that L2 norm (the server cannot check one update under secure aggregation)",
            )
        if not self.advertiser_dp.enabled:
            return
        reason = "when advertiser-dp.enabled = true"
        _require(
            self.server.weighting == "uniform",
            "server.weighting",
            self.server.weighting,
            f"uniform {reason}, because example-count weights make a client's share of the "
            "mean, and so the sensitivity the noise is scaled to, depend on reported counts",
        )
        _require(
            self.server.robust == "none",
            "server.robust",
            self.server.robust,
            f"none {reason}, because the median and trimmed mean have no sensitivity of "
            "clipping-norm / sampled clients that the noise could be scaled to",
        )
        _require(
            self.server.norm_bound == 0,
            "server.norm-bound",
            self.server.norm_bound,
            f"0 {reason}: advertiser-dp.clipping-norm bounds every update already",
        )
        if not self.server.secure_aggregation:
            return
        _require(
            self.server.max_update_norm == 0,
            "server.max-update-norm",
            self.server.max_update_norm,
            f"0 {reason} and server.secure-aggregation = true: each client clips its update "
            "to the round's advertiser-dp clipping norm, and the server cannot reject one "
            "update it never sees",
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build a config from nested tables or flat ``section.key`` entries (kebab-case)."""
        nested = _nest(values)
        kwargs: dict[str, Any] = {}
        for name, section_cls in _SECTIONS.items():
            if name in nested:
                kwargs[name.replace("-", "_")] = _build_section(section_cls, name, nested.pop(name))
        if "seed" in nested:
            kwargs["seed"] = _coerce("seed", nested.pop("seed"), 0)
        if "output" in nested:
            kwargs["output"] = _coerce("output", nested.pop("output"), "")
        if nested:
            raise ConfigError(
                f"unknown config keys {sorted(nested)}: expected the tables "
                "model, data, train, privacy, server, advertiser-dp, warm-start and the keys seed, "
                "output"
            )
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        """Read a TOML run config; unknown keys are errors, missing keys keep defaults."""
        return cls.from_dict(load_toml(path))

    def to_dict(self) -> dict[str, Any]:
        """Nested tables with kebab-case keys, as written to ``config.toml``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out[f.name.replace("_", "-")] = {
                    g.name.replace("_", "-"): getattr(value, g.name)
                    for g in dataclasses.fields(value)
                }
            else:
                out[f.name.replace("_", "-")] = value
        return out

    def to_flat(self) -> dict[str, Any]:
        """Flat ``section.key`` entries, the form of Flower's ``run_config``."""
        flat: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                flat.update({f"{key}.{sub}": item for sub, item in value.items()})
            else:
                flat[key] = value
        return flat

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def replace(self, **sections: Mapping[str, Any]) -> RunConfig:
        """Copy with some fields of some sections changed, e.g. ``replace(server={"num_rounds": 2})``."""
        changes: dict[str, Any] = {}
        for name, updates in sections.items():
            current = getattr(self, name)
            if dataclasses.is_dataclass(current):
                changes[name] = dataclasses.replace(current, **updates)  # type: ignore[type-var]
            else:
                changes[name] = updates
        return dataclasses.replace(self, **changes)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "privacy": PrivacyConfig,
    "server": ServerConfig,
    "advertiser-dp": AdvertiserDPConfig,
    "warm-start": WarmStartConfig,
}


def _nest(values: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in values.items():
        if "." in key:
            section, sub = key.split(".", 1)
            nested.setdefault(section, {})[sub] = value
        elif isinstance(value, Mapping):
            nested.setdefault(key, {}).update(value)
        else:
            nested[key] = value
    return nested


def _build_section(section_cls: type, section: str, values: Any) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"invalid [{section}]: expected a table, got {values!r}")
    known = {f.name.replace("_", "-"): f for f in dataclasses.fields(section_cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"unknown key {section}.{key}: expected one of {', '.join(sorted(known))}"
            )
        default = getattr(section_cls(), known[key].name)
        kwargs[known[key].name] = _coerce(f"{section}.{key}", value, default)
    return section_cls(**kwargs)


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Coerce TOML/CLI values to the default's type (ints are accepted for floats)."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"invalid {key} = {value!r}: expected true or false")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"invalid {key} = {value!r}: expected an integer")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"invalid {key} = {value!r}: expected a number")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise ConfigError(f"invalid {key} = {value!r}: expected a string")
    return value
