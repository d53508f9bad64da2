"""Cost ledger: what a run consumed and what it cost, kept in ``<run folder>/ledger.json``.

Every run (teacher collection, SFT, GRPO) counts tokens generated, tokens trained, teacher tokens
bought, judge API tokens (an LLM judge reward), wall time and device-hours by device kind, and
prices them with ``LedgerConfig``. With an open teacher on our own engines (on-policy distillation)
it also counts the tokens the teacher scored, the seconds that took, and the teacher engines' hours;
engines on devices of their own (``ledger.teacher_num_devices``) add their device-hours to the
run's. The file is rewritten atomically as the run goes, so a crash leaves the last saved state, and
a resumed run carries on from it. At the end ``summary()`` prints the run's cost and the cost per 1M
output tokens of serving the tuned model on the same hardware, next to the closed API's price:

    serving USD per 1M tokens = price per hour / (tokens per second * 3600) * 1e6

The throughput is the one measured while the run generated (batched sampling, the way a server
batches requests), so it is an estimate of serving cost, not a benchmark of a serving stack.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from rlhf.config import ConfigError, LedgerConfig

LEDGER_FILE = "ledger.json"


@dataclass
class LedgerTotals:
    """Running totals of one run (across resumes)."""

    run_kind: str  # "collect", "sft", "opd", "grpo"
    tokens_generated: int = 0
    generation_s: float = 0.0  # wall time spent generating those tokens
    tokens_trained: int = 0
    teacher_requests: int = 0  # requests paid for (cache hits are not)
    teacher_prompt_tokens: int = 0
    teacher_completion_tokens: int = 0
    # An open teacher on our engines: tokens it prefilled (prompt + completion), the seconds that
    # took, and engine-hours (teacher engines x the wall time they were up).
    teacher_tokens_scored: int = 0
    teacher_scoring_s: float = 0.0
    teacher_engine_hours: float = 0.0
    # An LLM judge reward's API use (rewards/builtin/judge.py): requests paid for, cache hits not.
    # Defaults let a ledger.json written before judges load (resume).
    judge_requests: int = 0
    judge_prompt_tokens: int = 0
    judge_completion_tokens: int = 0
    wall_s: float = 0.0
    device_hours: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CostReport:
    """Money derived from totals and prices (USD)."""

    compute_usd: float
    teacher_usd: float
    judge_usd: float
    total_usd: float
    tokens_per_s: float | None  # measured generation throughput; None if nothing was generated
    serving_usd_per_m: float | None  # our cost per 1M output tokens on this run's hardware
    closed_api_usd_per_m: float | None  # None when no closed-API price is configured
    closed_api_name: str  # which model that price is for (ledger.closed_api_name)
    ratio: float | None  # closed API price / our serving cost


# --- pure arithmetic ---------------------------------------------------------------------------


def device_cost_usd(device_hours: Mapping[str, float], prices: Mapping[str, float]) -> float:
    """Sum of hours * price per device-hour over device kinds."""
    missing = sorted(kind for kind in device_hours if kind not in prices)
    if missing:
        raise ConfigError(
            f"ledger.device_hour_price has no price for device kind(s) {missing} "
            f"(known: {sorted(prices)})"
        )
    return sum(hours * prices[kind] for kind, hours in device_hours.items())


def api_cost_usd(prompt_tokens: int, completion_tokens: int, prompt_price_per_m: float,
                 completion_price_per_m: float) -> float:
    """API bill for the given token counts at prices per 1M tokens."""
    return (prompt_tokens * prompt_price_per_m + completion_tokens * completion_price_per_m) / 1e6


def serving_usd_per_m(price_per_hour: float, tokens_per_s: float) -> float:
    """Cost of generating 1M tokens on hardware costing price_per_hour at tokens_per_s."""
    if tokens_per_s <= 0:
        raise ValueError(f"tokens_per_s={tokens_per_s} must be > 0")
    return price_per_hour / (tokens_per_s * 3600) * 1e6


def cost_report(totals: LedgerTotals, cfg: LedgerConfig, device_kind: str) -> CostReport:
    """Price the totals. Serving cost uses this run's device kind and device count."""
    compute = device_cost_usd(totals.device_hours, cfg.device_hour_price)
    teacher = api_cost_usd(totals.teacher_prompt_tokens, totals.teacher_completion_tokens,
                           cfg.teacher_prompt_price_per_m, cfg.teacher_completion_price_per_m)
    judge = api_cost_usd(totals.judge_prompt_tokens, totals.judge_completion_tokens,
                         cfg.judge_prompt_price_per_m, cfg.judge_completion_price_per_m)
    tps = serving = closed = ratio = None
    if totals.tokens_generated > 0 and totals.generation_s > 0:
        tps = totals.tokens_generated / totals.generation_s
        hourly = cfg.device_hour_price[device_kind] * cfg.num_devices
        serving = serving_usd_per_m(hourly, tps)
    if cfg.closed_api_completion_price_per_m > 0:
        closed = cfg.closed_api_completion_price_per_m
        if serving is not None and serving > 0:
            ratio = closed / serving
    return CostReport(compute_usd=compute, teacher_usd=teacher, judge_usd=judge,
                      total_usd=compute + teacher + judge,
                      tokens_per_s=tps, serving_usd_per_m=serving, closed_api_usd_per_m=closed,
                      closed_api_name=cfg.closed_api_name,
                      ratio=ratio)


def format_summary(totals: LedgerTotals, report: CostReport, device_kind: str) -> str:
    """The end-of-run text: what was used, what it cost, and the serving comparison."""
    hours = ", ".join(f"{k} {v:.4f} h" for k, v in sorted(totals.device_hours.items())) or "none"
    lines = [
        f"cost ledger ({totals.run_kind} run)",
        f"  wall time          {totals.wall_s:.1f} s; device-hours: {hours}",
        f"  tokens generated   {totals.tokens_generated:,}; tokens trained {totals.tokens_trained:,}",
        f"  teacher tokens     {totals.teacher_prompt_tokens:,} prompt + "
        f"{totals.teacher_completion_tokens:,} completion in {totals.teacher_requests:,} requests",
    ]
    if totals.teacher_tokens_scored or totals.teacher_engine_hours:
        lines.append(f"  teacher engines    {totals.teacher_tokens_scored:,} tokens scored in "
                     f"{totals.teacher_scoring_s:.1f} s; {totals.teacher_engine_hours:.4f} engine-hours")
    if totals.judge_requests:
        lines.append(f"  judge tokens       {totals.judge_prompt_tokens:,} prompt + "
                     f"{totals.judge_completion_tokens:,} completion in {totals.judge_requests:,} requests "
                     f"(${report.judge_usd:.4f})")
    judge = f", judge API ${report.judge_usd:.4f}" if totals.judge_requests else ""
    lines += [
        f"  run cost           ${report.total_usd:.4f} (compute ${report.compute_usd:.4f}, "
        f"teacher API ${report.teacher_usd:.4f}{judge})",
    ]
    if report.serving_usd_per_m is None:
        lines.append("  serving cost       not measured (the run generated no tokens)")
    else:
        lines.append(f"  serving cost       ${report.serving_usd_per_m:.4f} per 1M output tokens "
                     f"({report.tokens_per_s:.1f} tokens/s on {device_kind})")
    if report.closed_api_usd_per_m is None:
        lines.append("  closed API         price not set (ledger.closed_api_completion_price_per_m)")
    else:
        lines.append(f"  closed API         ${report.closed_api_usd_per_m:.4f} per 1M output tokens "
                     f"({report.closed_api_name})")
    if report.ratio is not None:
        lines.append(f"  ratio              closed API / tuned model = {report.ratio:.1f}x")
    return "\n".join(lines)


def detect_device_kind() -> str:
    """"cpu" without a GPU, else the GPU's short name ("NVIDIA H100 80GB HBM3" -> "h100")."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return short_device_name(torch.cuda.get_device_name(0))


def priced_device_kind(cfg: LedgerConfig) -> str:
    """ledger.device_kind ("auto": this machine's), refused by name when it has no price."""
    kind = detect_device_kind() if cfg.device_kind == "auto" else cfg.device_kind
    if kind not in cfg.device_hour_price:
        raise ConfigError(f"ledger.device_kind={kind!r} has no price in ledger.device_hour_price "
                          f"(known: {sorted(cfg.device_hour_price)})")
    return kind


def short_device_name(name: str) -> str:
    """The price-table key of a GPU name: its model code ("NVIDIA A100-SXM4-80GB" -> "a100")."""
    name = name.lower()
    match = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", name)
    return match.group(1) if match else re.sub(r"\W+", "-", name).strip("-")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so readers see the old or the new content, never a partial one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- the ledger --------------------------------------------------------------------------------


class CostLedger:
    """Counts a run's usage and keeps ``ledger.json`` current; resumes from an existing file."""

    def __init__(self, run_dir: str | Path, cfg: LedgerConfig, run_kind: str,
                 clock: Callable[[], float] = time.monotonic):
        self.path = Path(run_dir) / LEDGER_FILE
        self.cfg = cfg
        self.device_kind = priced_device_kind(cfg)  # fails before the run starts, not in the final summary
        for key in ("num_devices", "teacher_num_devices"):
            if getattr(cfg, key) < 0:
                raise ConfigError(f"ledger.{key}={getattr(cfg, key)} must be >= 0")
        self.totals = self._load(run_kind) if self.path.exists() else LedgerTotals(run_kind)
        # Totals from earlier sessions of this run; this session's time is added on top.
        self._base_wall_s = self.totals.wall_s
        self._base_hours = dict(self.totals.device_hours)
        self._base_teacher_hours = self.totals.teacher_engine_hours
        self._base_judge = (self.totals.judge_requests, self.totals.judge_prompt_tokens,
                            self.totals.judge_completion_tokens)
        self._teachers, self._teachers_t0 = 0, 0.0  # set_teacher_engines
        self._clock = clock
        self._t0 = clock()
        self._last_save = float("-inf")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    def _load(self, run_kind: str) -> LedgerTotals:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            totals = LedgerTotals(**data["totals"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{self.path}: not a ledger this code wrote ({e})") from e
        if totals.run_kind != run_kind:
            raise ValueError(
                f"{self.path} belongs to a {totals.run_kind!r} run; this is a {run_kind!r} run "
                "(use a separate run folder per stage)"
            )
        return totals

    def add_generated(self, tokens: int, seconds: float) -> None:
        self.totals.tokens_generated += tokens
        self.totals.generation_s += seconds
        self._maybe_save()

    def add_trained(self, tokens: int) -> None:
        self.totals.tokens_trained += tokens
        self._maybe_save()

    def add_teacher(self, prompt_tokens: int, completion_tokens: int, requests: int = 1) -> None:
        self.totals.teacher_requests += requests
        self.totals.teacher_prompt_tokens += prompt_tokens
        self.totals.teacher_completion_tokens += completion_tokens
        self._maybe_save()

    def add_teacher_scored(self, tokens: int, seconds: float) -> None:
        """Tokens an open teacher (our engines) prefilled to score the student's samples."""
        self.totals.teacher_tokens_scored += tokens
        self.totals.teacher_scoring_s += seconds
        self._maybe_save()

    def set_judge_usage(self, requests: int, prompt_tokens: int, completion_tokens: int) -> None:
        """The judge's API use in this session so far (cumulative, rewards.runner.ApiUsage), on top of
        what earlier sessions of the run paid."""
        base_r, base_p, base_c = self._base_judge
        self.totals.judge_requests = base_r + requests
        self.totals.judge_prompt_tokens = base_p + prompt_tokens
        self.totals.judge_completion_tokens = base_c + completion_tokens
        self._maybe_save()

    def set_teacher_engines(self, count: int) -> None:
        """From now on ``count`` teacher engines are up: their engine-hours accrue, and the
        device-hours of ``ledger.teacher_num_devices`` devices of their own."""
        self._teachers, self._teachers_t0 = count, self._clock()

    def _update_time(self) -> None:
        now = self._clock()
        session_s = now - self._t0
        self.totals.wall_s = self._base_wall_s + session_s
        teacher_s = now - self._teachers_t0 if self._teachers else 0.0
        device_s = self.cfg.num_devices * session_s + (self.cfg.teacher_num_devices * teacher_s if self._teachers else 0.0)
        hours = dict(self._base_hours)
        hours[self.device_kind] = hours.get(self.device_kind, 0.0) + device_s / 3600
        self.totals.device_hours = hours
        self.totals.teacher_engine_hours = self._base_teacher_hours + self._teachers * teacher_s / 3600

    def report(self) -> CostReport:
        self._update_time()
        return cost_report(self.totals, self.cfg, self.device_kind)

    def save(self) -> None:
        """Rewrite ledger.json atomically with the current totals and their cost."""
        report = self.report()
        payload = {
            "totals": asdict(self.totals),
            "cost": asdict(report),
            "device_kind": self.device_kind,
            "num_devices": self.cfg.num_devices,
            "prices": {
                "device_hour_price": dict(self.cfg.device_hour_price),
                "teacher_prompt_price_per_m": self.cfg.teacher_prompt_price_per_m,
                "teacher_completion_price_per_m": self.cfg.teacher_completion_price_per_m,
                "judge_prompt_price_per_m": self.cfg.judge_prompt_price_per_m,
                "judge_completion_price_per_m": self.cfg.judge_completion_price_per_m,
                "closed_api_name": self.cfg.closed_api_name,
                "closed_api_prompt_price_per_m": self.cfg.closed_api_prompt_price_per_m,
                "closed_api_completion_price_per_m": self.cfg.closed_api_completion_price_per_m,
            },
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(self.path, json.dumps(payload, indent=2) + "\n")
        self._last_save = self._clock()

    def _maybe_save(self) -> None:
        if self._clock() - self._last_save >= self.cfg.save_every_s:
            self.save()

    def summary(self) -> str:
        return format_summary(self.totals, self.report(), self.device_kind)

    def close(self) -> str:
        """Save the final state and return the summary text."""
        self.save()
        return self.summary()
