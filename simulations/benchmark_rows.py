"""Benchmark rows: the named run configs that each ``simulations.benchmark`` mode compares.

A row is a name for the table and the config entries it sets on top of the base config,
as flat ``section.key`` entries in the kebab-case of a TOML run config. The table shows
the entries that differ from the base config, so every row reads as the config diff of the
command that produced it. Building rows trains nothing, so tests can check them directly.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.config import ConfigError, RunConfig

FEDERATED_MODES = ("nodp", "dp", "strategies", "attack", "units")
MODES = ("central", *FEDERATED_MODES, "exposure", "cost", "aggregation")
STRATEGY_KEYS = ("fedavg", "fedavgm", "fedprox", "fedadam", "ffa-lora", "mixed-ranks")
# FedAvgM's row scales the averaged update by 1, as Hsu et al. do, whatever the
# base config's server-learning-rate (whose default is the FedOpt family's 0.01).
FEDAVGM_LEARNING_RATE = 1.0
MIXED_RANKS = "4,8,16"
DEFENSES = ("median", "trimmed-mean", "norm-bound")
# Record-level DP targets of each mode when --epsilons is not given.
DEFAULT_EPSILONS: dict[str, tuple[float, ...]] = {
    "dp": (8.0, 3.0),
    "exposure": (8.0, 3.0),
    "strategies": (8.0,),
    "attack": (8.0,),
    "units": (8.0,),
}


@dataclass(frozen=True)
class BenchmarkRow:
    """One setup of a benchmark mode.

    ``key`` names the row's run folder under the benchmark output and is unique among all
    rows. ``overrides`` are the flat ``section.key`` entries set on the base config.
    ``role`` tags the rows a mode summarises (``clean``, ``unprotected``, ``protected``
    in the attack mode), and ``epsilon`` is the DP target the row belongs to.
    """

    mode: str
    key: str
    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    epsilon: float | None = None
    role: str = ""

    def config(self, base: RunConfig) -> RunConfig:
        """Build the base config with this row's overrides (ConfigError when they are invalid)."""
        return apply_overrides(base, self.overrides)

    def config_diff(self, base: RunConfig) -> dict[str, Any]:
        """Return the overrides whose value differs from the base config's."""
        current = base.to_flat()
        return {key: value for key, value in self.overrides.items() if current.get(key) != value}


def apply_overrides(base: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """Return ``base`` with flat ``section.key`` entries replaced, validated as one config."""
    return RunConfig.from_dict({**base.to_flat(), **overrides})


def format_overrides(overrides: Mapping[str, Any]) -> str:
    """Format overrides as TOML-style ``key = value`` entries joined by ``; `` (empty: none)."""
    return "; ".join(
        f"{key} = {json.dumps(value, ensure_ascii=False)}" for key, value in overrides.items()
    )


def scale_overrides(
    *, num_rounds: int | None, num_clients: int | None, max_examples_per_client: int | None
) -> dict[str, int]:
    """Return the overrides that shrink every row of a benchmark (None: keep the config's value)."""
    requested = {
        "server.num-rounds": num_rounds,
        "data.num-clients": num_clients,
        "data.max-examples-per-client": max_examples_per_client,
    }
    return {key: value for key, value in requested.items() if value is not None}


def describe_base(cfg: RunConfig) -> str:
    """Describe in one line the base settings that the row names take for granted."""
    model, server = cfg.model, cfg.server
    ranks = f"mixed ranks {model.client_ranks}" if model.rank_list else f"rank {model.lora_r}"
    privacy = "record-level DP" if cfg.privacy.dp else "no record-level DP"
    if cfg.advertiser_dp.enabled:
        privacy += " + advertiser-level DP"
    return (
        f"LoRA {ranks}, FFA-LoRA {'on' if model.ffa_lora else 'off'}, strategy "
        f"{server.strategy}, {server.weighting} weighting, robust rule {server.robust}, "
        f"{privacy} (ε {cfg.privacy.target_epsilon:g}, δ {cfg.privacy.target_delta:g}), "
        f"{cfg.data.num_clients} clients, {server.num_rounds} rounds, fraction-train "
        f"{server.fraction_train:g}, max-examples-per-client "
        f"{cfg.data.max_examples_per_client or 'all'}"
    )


def _record_dp(epsilon: float) -> dict[str, Any]:
    return {"privacy.dp": True, "privacy.target-epsilon": epsilon}


def dp_rows(
    epsilons: Sequence[float], *, include_nodp: bool, include_dp: bool
) -> list[BenchmarkRow]:
    """Build the federated rows without DP and with record-level DP per ε."""
    rows = []
    if include_nodp:
        rows.append(BenchmarkRow("nodp", "fed-nodp", "federated, no DP", {"privacy.dp": False}))
    if include_dp:
        rows += [
            BenchmarkRow(
                "dp", f"fed-dp-eps{e:g}", f"federated, DP ε={e:g}", _record_dp(e), epsilon=e
            )
            for e in epsilons
        ]
    return rows


def _strategy_variant(base: RunConfig, key: str) -> tuple[str, dict[str, Any]]:
    """Name and overrides of one strategy row, named by what differs from the base config.

    FFA-LoRA and ``model.client-ranks`` cannot be combined, and neither can
    ``model.client-ranks`` and secure aggregation, so a row that turns one on turns the
    other off and names that change.
    """
    model, server = base.model, base.server
    fedavg = {"server.strategy": "fedavg"}
    if key == "fedavg":
        return "FedAvg", fedavg
    if key == "fedavgm":
        name = (
            f"FedAvgM (server learning rate {FEDAVGM_LEARNING_RATE:g}, momentum "
            f"{server.server_momentum:g})"
        )
        return name, {
            "server.strategy": "fedavgm",
            "server.server-learning-rate": FEDAVGM_LEARNING_RATE,
        }
    if key == "fedprox":
        return f"FedProx (μ={server.proximal_mu:g})", {"server.strategy": "fedprox"}
    if key == "fedadam":
        name = f"FedAdam (server learning rate {server.server_learning_rate:g})"
        return name, {"server.strategy": "fedadam"}
    if key == "ffa-lora":
        if model.ffa_lora:
            return "FedAvg, lora_A trained (FFA-LoRA off)", {**fedavg, "model.ffa-lora": False}
        name = "FedAvg, FFA-LoRA (lora_A frozen)"
        overrides: dict[str, Any] = {**fedavg, "model.ffa-lora": True}
        if model.rank_list:
            name += f", one LoRA rank {model.lora_r} (FFA-LoRA excludes mixed ranks)"
            overrides["model.client-ranks"] = ""
        return name, overrides
    if key == "mixed-ranks":
        if model.rank_list:
            return f"FedAvg, one LoRA rank {model.lora_r}", {**fedavg, "model.client-ranks": ""}
        name = f"FedAvg, mixed LoRA ranks {MIXED_RANKS}"
        overrides = {**fedavg, "model.client-ranks": MIXED_RANKS}
        if model.ffa_lora:
            name += ", lora_A trained (mixed ranks exclude FFA-LoRA)"
            overrides["model.ffa-lora"] = False
        if server.secure_aggregation:
            name += ", secure aggregation off (it needs one rank)"
            overrides["server.secure-aggregation"] = False
        return name, overrides
    raise ConfigError(
        f"invalid strategy row {key!r}: expected one or more of {', '.join(STRATEGY_KEYS)}"
    )


def parse_strategy_keys(text: str) -> tuple[str, ...]:
    """Parse ``--strategies`` (comma-separated, empty: all) into row keys."""
    keys = tuple(part.strip() for part in text.split(",") if part.strip()) or STRATEGY_KEYS
    unknown = [key for key in keys if key not in STRATEGY_KEYS]
    if unknown:
        raise ConfigError(
            f"invalid --strategies entries {unknown}: expected a comma-separated subset of "
            f"{','.join(STRATEGY_KEYS)}"
        )
    return keys


def strategy_rows(
    base: RunConfig, epsilons: Sequence[float], keys: Sequence[str] = STRATEGY_KEYS
) -> list[BenchmarkRow]:
    """Build record-level DP rows per ε: FedAvg, FedAvgM, FedProx, FedAdam, FFA-LoRA, mixed ranks."""
    rows = []
    for epsilon in epsilons:
        for key in keys:
            name, overrides = _strategy_variant(base, key)
            rows.append(
                BenchmarkRow(
                    "strategies",
                    f"strategies-{key}-eps{epsilon:g}",
                    f"{name}, DP ε={epsilon:g}",
                    {**_record_dp(epsilon), **overrides},
                    epsilon=epsilon,
                )
            )
    return rows


def _defense(base: RunConfig, rule: str, norm_bound: float) -> tuple[str, dict[str, Any]]:
    """Return the table label and overrides of the robust rule that protects against the attack."""
    if rule == "median":
        return "coordinate-wise median", {"server.robust": "median", "server.norm-bound": 0.0}
    if rule == "trimmed-mean":
        label = f"trimmed mean ({base.server.trim_fraction:g} cut at each end)"
        return label, {"server.robust": "trimmed-mean", "server.norm-bound": 0.0}
    if rule == "norm-bound":
        if not norm_bound > 0:
            raise ConfigError(
                f"invalid --attack-norm-bound {norm_bound!r} with --attack-defense norm-bound: "
                "expected the L2 norm (> 0) each update is scaled down to, e.g. 1.0"
            )
        return f"norm bound {norm_bound:g}", {
            "server.robust": "none",
            "server.norm-bound": norm_bound,
        }
    raise ConfigError(f"invalid --attack-defense {rule!r}: expected {' or '.join(DEFENSES)}")


def attack_rows(
    base: RunConfig,
    epsilons: Sequence[float],
    *,
    client: int,
    scale: float,
    defense: str,
    norm_bound: float = 0.0,
) -> list[BenchmarkRow]:
    """Build the clean, attacked-unprotected and attacked-protected rows per ε.

    The attacked rows make partition ``client`` hostile (``data.attack-client``): it
    multiplies its update by ``scale``. The protected row aggregates with ``defense``.
    Under record-level DP each update is already private when it reaches the server, so a
    robust rule is post-processing and keeps the guarantee.
    """
    if base.advertiser_dp.enabled:
        raise ConfigError(
            "invalid advertiser-dp.enabled = true for --only attack: its clipping bounds "
            "every update, so no run would be unprotected, and it requires server.robust = "
            "none; use a base config with advertiser-level DP off"
        )
    if base.server.secure_aggregation:
        raise ConfigError(
            "invalid server.secure-aggregation = true for --only attack: every client clips "
            "its own update and the robust rules need updates in the clear; use a base "
            "config with secure aggregation off"
        )
    label, protection = _defense(base, defense, norm_bound)
    # Update-norm rejection would stop the scaled update too, so it is off in every row.
    protection["server.max-update-norm"] = 0.0
    unprotected = {"server.robust": "none", "server.norm-bound": 0.0, "server.max-update-norm": 0.0}
    attack = {"data.attack-client": client, "data.attack-scale": scale}
    attacker = f"attacked (client {client} scales its update ×{scale:g})"
    rows = []
    for epsilon in epsilons:
        dp = _record_dp(epsilon)
        suffix = f"DP ε={epsilon:g}"
        rows += [
            BenchmarkRow(
                "attack",
                f"attack-clean-eps{epsilon:g}",
                f"clean, no robust rule, {suffix}",
                {**dp, "data.attack-client": -1, **unprotected},
                epsilon=epsilon,
                role="clean",
            ),
            BenchmarkRow(
                "attack",
                f"attack-unprotected-eps{epsilon:g}",
                f"{attacker}, no robust rule, {suffix}",
                {**dp, **attack, **unprotected},
                epsilon=epsilon,
                role="unprotected",
            ),
            BenchmarkRow(
                "attack",
                f"attack-protected-eps{epsilon:g}",
                f"{attacker}, {label}, {suffix}",
                {**dp, **attack, **protection},
                epsilon=epsilon,
                role="protected",
            ),
        ]
    return rows


def unit_rows(base: RunConfig, epsilons: Sequence[float]) -> list[BenchmarkRow]:
    """Build advertiser-level DP and record-level DP rows per ε.

    The advertiser-level row uses uniform weighting and turns record-level DP off. Both
    rows spend the same (ε, δ), with δ from ``privacy.target-delta``, so they differ
    in the privacy unit: all of one advertiser's records, or one record.
    """
    delta = base.privacy.target_delta
    advertiser: dict[str, Any] = {
        "privacy.dp": False,
        "advertiser-dp.enabled": True,
        "advertiser-dp.noise-multiplier": 0.0,
        "advertiser-dp.target-delta": delta,
        # Advertiser-level DP divides by the sampled clients with equal weights and clips
        # every update itself, so its config rejects other weights, robust rules and bounds.
        "server.weighting": "uniform",
        "server.robust": "none",
        "server.norm-bound": 0.0,
    }
    if base.server.secure_aggregation:
        advertiser["server.max-update-norm"] = 0.0
    rows = []
    for epsilon in epsilons:
        rows += [
            BenchmarkRow(
                "units",
                f"units-advertiser-eps{epsilon:g}",
                f"advertiser-level DP ε={epsilon:g} (unit: all of one advertiser's records), "
                "uniform weighting",
                {**advertiser, "advertiser-dp.target-epsilon": epsilon},
                epsilon=epsilon,
            ),
            BenchmarkRow(
                "units",
                f"units-record-eps{epsilon:g}",
                f"record-level DP ε={epsilon:g} (unit: one record)",
                {**_record_dp(epsilon), "advertiser-dp.enabled": False},
                epsilon=epsilon,
            ),
        ]
    return rows


def exposure_rows(epsilons: Sequence[float]) -> list[BenchmarkRow]:
    """Build one canary audit row per ε; each audit trains a DP run and a non-DP control."""
    return [
        BenchmarkRow(
            "exposure",
            f"exposure-eps{epsilon:g}",
            f"canary audit, record-level DP ε={epsilon:g}",
            _record_dp(epsilon),
            epsilon=epsilon,
        )
        for epsilon in epsilons
    ]


def parse_epsilons(text: str | None, mode: str) -> tuple[float, ...]:
    """Parse ``--epsilons`` into numbers, or return the mode's default when it is None."""
    if text is None:
        return DEFAULT_EPSILONS[mode]
    try:
        epsilons = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(
            f"invalid --epsilons {text!r}: expected comma-separated numbers, e.g. 8,3"
        ) from None
    if not epsilons or not all(0 < e < float("inf") for e in epsilons):
        raise ConfigError(f"invalid --epsilons {text!r}: expected finite numbers > 0, e.g. 8,3")
    return epsilons


def build_rows(
    modes: Collection[str],
    base: RunConfig,
    *,
    epsilons: str | None = None,
    strategies: str = "",
    attack_client: int = 0,
    attack_scale: float = 100.0,
    attack_defense: str = "median",
    attack_norm_bound: float = 0.0,
) -> list[BenchmarkRow]:
    """Build the rows of the federated and exposure ``modes``, in table order.

    ``epsilons`` is the ``--epsilons`` text (None: each mode's default). Every row's config
    is built once here, so an invalid combination raises ConfigError before any run starts.
    """
    rows = dp_rows(
        parse_epsilons(epsilons, "dp"), include_nodp="nodp" in modes, include_dp="dp" in modes
    )
    if "strategies" in modes:
        keys = parse_strategy_keys(strategies)
        rows += strategy_rows(base, parse_epsilons(epsilons, "strategies"), keys)
    if "attack" in modes:
        rows += attack_rows(
            base,
            parse_epsilons(epsilons, "attack"),
            client=attack_client,
            scale=attack_scale,
            defense=attack_defense,
            norm_bound=attack_norm_bound,
        )
    if "units" in modes:
        rows += unit_rows(base, parse_epsilons(epsilons, "units"))
    if "exposure" in modes:
        rows += exposure_rows(parse_epsilons(epsilons, "exposure"))
    for row in rows:
        row.config(base)
    return rows
