"""Memorisation audit: exposure of a planted canary, with and without DP.

The test follows Carlini et al. (2019), "The Secret Sharer: Evaluating and Testing
Unintended Memorization in Neural Networks". A random secret of a fixed format (``"my
voucher code is 482915"``) is planted ``repeats`` times in one advertiser's records. The
same federated run is trained twice, once with the config's DP settings and once without
DP as a control. Under each global adapter the secret's log-perplexity given its source
and the format's prefix is ranked among ``candidates`` random codes of the same format
that were never trained on; by default every other code of the format, so the rank is
exact. The exposure is ``log2(R) - log2(rank)`` for R candidates: about 0 when the
secret is no more likely than a random code, and at most ``log2(R)`` when it is the most
likely of all. ``simulations.perplexity`` scores the candidates over their token tree,
which makes a whole space of 10^6 codes a matter of minutes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.pii import scrub_text
from client.runtime import scrub_config
from common.config import ConfigError, RunConfig
from simulations.perplexity import log_perplexities

logger = logging.getLogger(__name__)

AUDIT_JSON = "audit.json"
AUDIT_MD = "audit.md"
CODE_FIELD = "{code}"
# Most candidates one audit scores. 10^6 codes took 2.5 minutes per run on 2 CPU cores,
# so this cap keeps scoring near half an hour per run.
MAX_CANDIDATES = 10_000_000
# Candidates the skew-normal of the extrapolated exposure is fitted to; more change the fit
# little and make it slower.
_FIT_SAMPLE = 100_000
# Stream label mixed into the run seed, so the secret and candidates do not reuse the
# random numbers of the data split.
_AUDIT_STREAM = 0x5EC12E7


@dataclass(frozen=True)
class CanaryFormat:
    """A secret's format: ``template`` with ``{code}`` replaced by ``digits`` random digits."""

    template: str = "my voucher code is {code}"
    digits: int = 6

    def __post_init__(self) -> None:
        if self.template.count(CODE_FIELD) != 1:
            raise ConfigError(
                f"invalid canary format {self.template!r}: expected exactly one {CODE_FIELD} "
                "where the random digits go, e.g. 'my voucher code is {code}'"
            )
        if not 1 <= self.digits <= 12:
            raise ConfigError(f"invalid code digits {self.digits}: expected 1 to 12")

    @property
    def space(self) -> int:
        """Number of possible codes, the size of the secret's randomness space."""
        return 10**self.digits

    def render(self, code: int) -> str:
        return self.template.replace(CODE_FIELD, f"{code:0{self.digits}d}")


@dataclass(frozen=True)
class AuditSettings:
    """Settings of the canary audit: what it plants and how it ranks the secret.

    Parameters
    ----------
    canary : CanaryFormat
        Format of the secret and of the candidates.
    repeats : int, default 20
        Copies of the canary record planted in the advertiser's partition (k).
    candidates : int, default 0
        Random codes the secret is ranked against (R). 0, or any R of at least the size of
        the code space minus one, ranks it against every other code, which makes the rank
        exact. For 6 digits that is 999,999 codes, scored in minutes on a CPU. The
        exposure can't exceed ``log2(R)``.
    canary_client : int, default 0
        Partition index of the advertiser whose records contain the canary.
    batch_size : int, default 256
        Nodes of the candidates' token tree scored per forward pass.
    """

    canary: CanaryFormat = CanaryFormat()
    repeats: int = 20
    candidates: int = 0
    canary_client: int = 0
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ConfigError(f"invalid repeats {self.repeats}: expected an integer >= 1")
        if self.candidates < 0:
            raise ConfigError(
                f"invalid candidates {self.candidates}: expected an integer >= 1, or 0 for "
                "every other code of the format"
            )
        if self.candidate_count > MAX_CANDIDATES:
            requested = "0 (every other code)" if self.candidates == 0 else str(self.candidates)
            raise ConfigError(
                f"invalid candidates {requested} for {self.canary.digits} code digits: "
                f"{self.candidate_count:,} codes would take hours to score. Pass "
                f"--candidates N with N at most {MAX_CANDIDATES:,}, or fewer --code-digits"
            )
        if self.canary_client < 0:
            raise ConfigError(f"invalid canary client {self.canary_client}: expected >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"invalid batch size {self.batch_size}: expected >= 1")

    @property
    def candidate_count(self) -> int:
        """R, the number of codes the secret is ranked against."""
        others = self.canary.space - 1
        return others if self.candidates == 0 else min(self.candidates, others)


def draw_codes(space: int, candidates: int, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """Draw the secret code and ``candidates`` distinct other codes from ``range(space)``."""
    secret = int(rng.integers(space))
    count = min(candidates, space - 1)
    others = rng.choice(space - 1, size=count, replace=False)  # codes other than the secret
    others = others + (others >= secret)  # (R,) skip the secret's value
    return secret, others.astype(np.int64)


def exposure(secret_score: float, candidate_scores: np.ndarray) -> tuple[int, float]:
    """Rank of the secret (1 = most likely) among itself and the candidates, and its exposure.

    Candidates with the same log-perplexity as the secret rank below it.
    """
    rank = 1 + int(np.sum(candidate_scores < secret_score))
    return rank, math.log2(len(candidate_scores)) - math.log2(rank)


def extrapolated_exposure(
    secret_score: float, candidate_scores: np.ndarray, *, space: int, seed: int = 0
) -> float:
    """Exposure over the whole code space, from a skew-normal fit to the candidates' scores.

    Carlini et al. (2019, section 4.3) model the log-perplexities of all codes as a
    skew-normal distribution fitted to a sample of them. The secret's exposure is then
    ``-log2 F(secret_score)`` for the fitted CDF ``F``. Unlike the rank, this can exceed
    ``log2(R)`` for R sampled candidates, but it is only as good as the fit's lower tail.
    It is capped at ``log2(space - 1)``, the exposure of a secret ranked first among all
    other codes. The fit uses at most 100,000 of the candidates, drawn with ``seed``.
    """
    from scipy import stats

    sample = np.asarray(candidate_scores, dtype=np.float64)
    if len(sample) > _FIT_SAMPLE:
        sample = np.random.default_rng(seed).choice(sample, size=_FIT_SAMPLE, replace=False)
    shape, loc, scale = stats.skewnorm.fit(sample)
    log_cdf = float(stats.skewnorm.logcdf(secret_score, shape, loc=loc, scale=scale))
    return min(-log_cdf / math.log(2), math.log2(space - 1))


def _client_privacy(run_dir: Path, client_id: str) -> dict[str, Any]:
    privacy = json.loads((run_dir / "privacy.json").read_text(encoding="utf-8"))
    entry = privacy.get("clients", {}).get(client_id, {})
    return {
        "dp_enabled": privacy.get("dp_enabled"),
        "epsilon": entry.get("epsilon") if privacy.get("dp_enabled") else None,
        "delta": privacy.get("delta") if privacy.get("dp_enabled") else None,
        "accountant": entry.get("accountant") if privacy.get("dp_enabled") else None,
        "noise_multiplier": entry.get("noise_multiplier") or 0.0,
        "steps": entry.get("steps"),
        "clipping_norm": privacy.get("clipping_norm"),
        "secure_mode": privacy.get("secure_mode"),
    }


def _initial_model(run_dir: Path) -> tuple[torch.nn.Module, Any, RunConfig]:
    """Base model with the adapter that round 1 of the run in ``run_dir`` started from."""
    from peft import PeftModel

    from common.model import build_lora_model, load_base_model, load_tokenizer

    cfg = RunConfig.from_toml(run_dir / "config.toml")
    warm_start_dir = run_dir / "warm_start"
    if (warm_start_dir / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(load_base_model(cfg.model.name), str(warm_start_dir))
    else:
        # As the server builds it before round 1 (server.loop.run_rounds).
        model_cfg = dataclasses.replace(cfg.model, lora_r=cfg.model.max_rank)
        model = build_lora_model(model_cfg, seed=cfg.seed)
    model.eval()
    return model, load_tokenizer(cfg.model.name), cfg


def score_run(
    run_dir: Path,
    source: str,
    secret: str,
    candidates: Sequence[str],
    *,
    space: int,
    batch_size: int,
    initial: bool = False,
) -> dict[str, Any]:
    """Rank ``secret`` among ``candidates`` under the global adapter of ``run_dir``.

    ``space`` is the number of codes of the format, which caps the extrapolated exposure.
    With ``initial``, the adapter the run started from is scored instead: its
    ``warm_start/`` adapter, or without a warm start the fresh adapter of its seed.
    """
    if initial:
        model, tokenizer, cfg = _initial_model(run_dir)
    else:
        from common.inference import load_run_model

        model, tokenizer, cfg = load_run_model(run_dir)
    started = time.perf_counter()
    scores = log_perplexities(
        model,
        tokenizer,
        source,
        [secret, *candidates],
        batch_size=batch_size,
        max_length=cfg.model.max_length,
        show_progress=True,
    )
    rank, bits = exposure(float(scores[0]), scores[1:])
    extrapolated = extrapolated_exposure(float(scores[0]), scores[1:], space=space)
    logger.info(
        "audit: %s: rank %s of %s, exposure %.2f bits (extrapolated %.2f)",
        f"{run_dir.name} (initial adapter)" if initial else run_dir.name,
        rank,
        len(scores),
        bits,
        extrapolated,
    )
    return {
        "run_dir": str(run_dir),
        "rank": rank,
        "exposure": bits,
        "extrapolated_exposure": extrapolated,
        "secret_log_perplexity": float(scores[0]),
        "candidate_log_perplexity_median": float(np.median(scores[1:])),
        "candidate_log_perplexity_min": float(np.min(scores[1:])),
        "scoring_time_s": time.perf_counter() - started,
    }


def simulate_in_subprocess(cfg: RunConfig, config_path: Path) -> Path:
    """Run ``fedads simulate`` on ``cfg`` in a new process and return the run folder.

    Each simulation gets a process and a Ray cluster of its own, as from the command line:
    a second simulation in the same process would reuse the first one's Ray state.
    """
    cfg = cfg.replace(data={"data_dir": str(Path(cfg.data.data_dir).resolve())})
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(cfg.to_toml(), encoding="utf-8")
    command = [sys.executable, "-m", "common.cli", "simulate", "--config", str(config_path)]
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"audit: the simulation of {config_path} failed with exit code "
            f"{result.returncode}: see its log above"
        )
    return Path(cfg.output)


def run_audit(cfg: RunConfig, out_dir: str | Path, settings: AuditSettings) -> dict[str, Any]:
    """Plant a canary, train a DP run and a non-DP control, and write the audit files.

    Both runs use ``cfg`` (its model, data, rounds, training and seed) through ``fedads
    simulate``, with fresh ledgers, so they take the same number of steps and differ only
    in ``privacy.dp``. Writes ``dp/`` and ``control/`` run folders, ``audit.json`` and
    ``audit.md`` under ``out_dir`` and returns the content of ``audit.json``.
    """
    from simulations.dataset import federated_data

    out_dir = Path(out_dir).resolve()
    if (out_dir / AUDIT_JSON).exists():
        raise FileExistsError(f"{out_dir} already contains an audit: pass a new --output folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        # Also the remains of a stopped audit: its run folders would clash with new ones.
        raise FileExistsError(
            f"{out_dir} is not empty (a stopped audit leaves dp/ and control/ there): pass "
            "a new --output folder"
        )
    if settings.canary_client >= cfg.data.num_clients:
        raise ConfigError(
            f"invalid --canary-client {settings.canary_client}: the run has "
            f"{cfg.data.num_clients} clients, so pick 0 to {cfg.data.num_clients - 1}"
        )
    if not cfg.privacy.dp:
        raise ConfigError(
            "invalid privacy.dp = false: the audit compares the config's DP run with a "
            "non-DP control, so turn DP on (drop --no-dp)"
        )

    # Draw the secret and the candidates, and check that PII scrubbing leaves them alone.
    rng = np.random.default_rng([cfg.seed, _AUDIT_STREAM])
    secret_code, candidate_codes = draw_codes(settings.canary.space, settings.candidate_count, rng)
    secret = settings.canary.render(secret_code)
    candidates = [settings.canary.render(int(code)) for code in candidate_codes]
    kinds = cfg.privacy.scrub_kind_set
    if kinds and scrub_text(secret, scrub_config(kinds))[0] != secret:
        raise ConfigError(
            f"canary format {settings.canary.template!r} with {settings.canary.digits} digits "
            "is changed by PII scrubbing, so the model would never see the secret: choose "
            "another format or fewer digits"
        )

    # Train the DP run and the control on the same data with the canary planted.
    base = cfg.replace(
        data={
            "canary_client": settings.canary_client,
            "canary_repeats": settings.repeats,
            "canary_secret": secret,
        },
        privacy={"ledger_dir": ""},
    )
    canary = federated_data(base.data, base.seed).canary
    assert canary is not None
    runs = {
        "dp": base.replace(output=str(out_dir / "dp")),
        "control": base.replace(privacy={"dp": False}, output=str(out_dir / "control")),
    }
    client_id = f"client-{settings.canary_client:03d}"  # simulation ids, see client_identity
    results: dict[str, Any] = {}
    for name, run_cfg in runs.items():
        logger.info("audit: training the %s run", name)
        run_dir = simulate_in_subprocess(run_cfg, out_dir / f"{name}.toml")
        results[name] = {
            **score_run(
                run_dir,
                canary.source,
                secret,
                candidates,
                space=settings.canary.space,
                batch_size=settings.batch_size,
            ),
            **_client_privacy(run_dir, client_id),
        }

    # The adapter both runs started from never saw an advertiser record, so its exposure is
    # what the format and the public data alone give: the floor the DP run is judged by.
    logger.info("audit: scoring the initial adapter, which never saw the secret")
    baseline = score_run(
        out_dir / "dp",
        canary.source,
        secret,
        candidates,
        space=settings.canary.space,
        batch_size=settings.batch_size,
        initial=True,
    )

    audit = {
        "method": "exposure of a planted canary (Carlini et al. 2019, The Secret Sharer)",
        "secret_format": settings.canary.template,
        "code_digits": settings.canary.digits,
        "code_space": settings.canary.space,
        "secret": secret,
        "repeats": settings.repeats,
        "candidates": len(candidates),
        "max_exposure": math.log2(len(candidates)),
        "canary_client": settings.canary_client,
        "canary_client_id": client_id,
        "num_rounds": cfg.server.num_rounds,
        "num_clients": cfg.data.num_clients,
        "target_epsilon": cfg.privacy.target_epsilon,
        "runs": results,
        "baseline": baseline,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / AUDIT_JSON).write_text(json.dumps(audit, indent=2), encoding="utf-8")
    (out_dir / AUDIT_MD).write_text(render_audit(audit), encoding="utf-8")
    logger.info("audit: wrote %s and %s", out_dir / AUDIT_JSON, out_dir / AUDIT_MD)
    return audit


def _fmt(value: Any, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def _table_row(label: str, privacy_cells: list[str], scores: dict[str, Any]) -> str:
    """Format one audit table row: the label, the DP settings, then the scoring results."""
    cells = [
        label,
        *privacy_cells,
        str(scores["rank"]),
        f"{scores['exposure']:.2f}",
        _fmt(scores.get("extrapolated_exposure"), ".2f"),
        f"{scores['secret_log_perplexity']:.2f}",
        f"{scores['candidate_log_perplexity_median']:.2f}",
    ]
    return "| " + " | ".join(cells) + " |"


def render_audit(audit: dict[str, Any]) -> str:
    """Markdown page of an audit result (the content of ``audit.json``)."""
    whole_space = audit["candidates"] >= audit["code_space"] - 1
    candidates = (
        f"all {audit['candidates']:,} other codes of the format"
        if whole_space
        else f"{audit['candidates']:,} random codes of the same format"
    )
    method = (
        f"Method: {audit['method']}. The secret `{audit['secret']}` (format "
        f"`{audit['secret_format']}`, {audit['code_digits']} random digits) was planted "
        f"{audit['repeats']} times in the records of {audit['canary_client_id']}. Its "
        f"log-perplexity under each global adapter was ranked among {candidates}, "
        "none of which was trained on."
    )
    definition = (
        "Exposure = log2(R) - log2(rank), for R candidates. About 0 means the secret is no "
        "more likely than a random code. The largest value this audit can show is "
        f"log2(R) = {audit['max_exposure']:.2f} bits. The extrapolated exposure fits a "
        "skew-normal to the candidates' log-perplexities and reads the secret's tail "
        "probability from it (Carlini et al., section 4.3); it can exceed log2(R), up to "
        f"log2 of the {audit['code_space'] - 1:,} other codes "
        f"({math.log2(audit['code_space'] - 1):.2f} bits)."
    )
    header = (
        "| run | DP | ε | δ | accountant | noise multiplier | rank | exposure (bits) "
        "| extrapolated exposure (bits) | secret log-perplexity (bits) "
        "| median candidate log-perplexity (bits) |"
    )
    lines = ["# Memorisation audit", "", method, "", definition, "", header, "|---" * 11 + "|"]
    for name in ("dp", "control"):
        run = audit["runs"][name]
        privacy_cells = [
            "on" if run["dp_enabled"] else "off",
            _fmt(run["epsilon"], ".2f"),
            _fmt(run["delta"], ".1e"),
            run["accountant"] or "n/a",
            _fmt(run["noise_multiplier"]),
        ]
        label = "DP" if name == "dp" else "control"
        lines.append(_table_row(label, privacy_cells, run))
    baseline = audit.get("baseline")
    if baseline:
        label = "initial adapter, before any advertiser record"
        lines.append(_table_row(label, ["n/a"] * 5, baseline))
    same_config = (
        f"Both runs used the same config ({audit['num_clients']} clients, "
        f"{audit['num_rounds']} round{'s' if audit['num_rounds'] != 1 else ''}, target ε "
        f"{audit['target_epsilon']:g}) and the same "
        "number of steps, and differ only in DP. ε is the canary client's."
    )
    lines += ["", same_config, ""]
    if not whole_space:
        scope = (
            "NOTE: the exposure is estimated from R sampled candidates, so it says how far "
            "the secret stands out among them, not its rank among all codes."
        )
    else:
        scope = "The secret was ranked against every other code, so its rank is exact."
    lines += [scope, ""]
    return "\n".join(lines)
