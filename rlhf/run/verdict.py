"""The verdict's arithmetic (python -m rlhf.compare): quality, win rate, cost, latency, break-even.

Pure functions over per-prompt tables, and the report a person reads (markdown, one console
line); no engine, no HTTP. Prompts are the unit everywhere (one answer per prompt and model).

- Quality: the mean of one reward over the prompts it scored, ± its standard error
  (std with ddof 1 / sqrt(prompts)). A None (the reward could not score) is left out and counted.
- Win rate of an open model against the closed one: per prompt 1 (its reward above the closed
  answer's), 0.5 (equal) or 0 (below), or a pairwise judge's own score; the mean over prompts
  with a 95% confidence interval from the normal approximation, mean ± 1.96 x std / sqrt(prompts).
  With few prompts or a rate near 0 or 1 that interval is rough (it can pass 0 or 1: it is clipped).
- Cost per 1M output tokens: the closed API's list price; an open model's serving cost at the
  throughput measured on our engines (rlhf/run/ledger.py serving_usd_per_m).
- Latency per request: median and p95 (linear interpolation between order statistics, numpy's
  default) of single requests timed one at a time.
- Break-even: :func:`break_even_m_tokens`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


@dataclass(frozen=True)
class Estimate:
    """A mean over prompts and its standard error; NaN when nothing was scored."""

    mean: float
    stderr: float
    n: int  # prompts scored
    missing: int = 0  # prompts whose value was None (not scored): left out, never counted as 0


@dataclass(frozen=True)
class WinRate:
    rate: float
    half_width: float  # of the 95% interval (normal approximation over prompts)
    low: float
    high: float
    n: int  # prompts where both sides were scored
    missing: int = 0


@dataclass(frozen=True)
class Latency:
    median_s: float
    p95_s: float
    n: int


@dataclass
class ModelVerdict:
    """One model's figures: the closed model's has no win rate and a list price for its cost."""

    label: str
    model: str  # the API model name, or the folder the engines loaded
    scores: list[float | None]  # the quality reward, per prompt
    answer_tokens: list[int | None]  # output tokens per answer (None: the API reported no usage)
    quality: Estimate
    usd_per_m: float  # per 1M output tokens
    latency: Latency
    tokens_per_s: float | None = None  # batched generation on our engines (open models)
    wins: list[float | None] | None = None  # per prompt, against the closed model (open models)
    win_rate: WinRate | None = None
    break_even_m_tokens: float | None = None  # per month; None: never (open models)
    rewards: dict[str, list[float | None]] = field(default_factory=dict)  # every reward, per prompt


@dataclass
class Verdict:
    closed: ModelVerdict
    open: list[ModelVerdict]
    reward: str  # the quality reward's name
    win_from: str  # "reward" (compared values) or the pairwise reward's name
    closed_price: dict[str, object]  # name, prompt/completion USD per 1M, date
    device_kind: str
    num_devices: int
    device_hour_usd: float
    monthly_hours: float
    prompts: int
    extra: dict[str, object] = field(default_factory=dict)


def estimate(values: Sequence[float | None]) -> Estimate:
    """Mean ± standard error of the values that are not None."""
    got = [float(v) for v in values if v is not None]
    n = len(got)
    if n == 0:
        return Estimate(math.nan, math.nan, 0, len(values))
    mean = sum(got) / n
    var = sum((v - mean) ** 2 for v in got) / (n - 1) if n > 1 else 0.0
    return Estimate(mean, math.sqrt(var / n), n, len(values) - n)


def win_scores(open_values: Sequence[float | None], closed_values: Sequence[float | None]) -> list[float | None]:
    """Per prompt: 1 when the open answer's reward is above the closed one's, 0.5 equal, 0 below;
    None when either was not scored."""
    if len(open_values) != len(closed_values):
        raise ValueError(f"{len(open_values)} open scores for {len(closed_values)} closed ones")
    return [None if o is None or c is None else 1.0 if o > c else 0.5 if o == c else 0.0
            for o, c in zip(open_values, closed_values)]


def win_rate(wins: Sequence[float | None]) -> WinRate:
    """Mean win score over prompts with its 95% interval, mean ± 1.96 x stderr, clipped to [0, 1]."""
    e = estimate(wins)
    half = Z95 * e.stderr
    return WinRate(e.mean, half, max(0.0, e.mean - half), min(1.0, e.mean + half), e.n, e.missing)


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (numpy's default):
    position q x (n - 1) in the sorted values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def latency(seconds: Sequence[float]) -> Latency:
    return Latency(quantile(seconds, 0.5), quantile(seconds, 0.95), len(seconds))


def monthly_cost_usd(device_hour_usd: float, num_devices: int, monthly_hours: float) -> float:
    """What the self-hosted deployment costs a month, whatever the volume up to its capacity."""
    return device_hour_usd * num_devices * monthly_hours


def break_even_m_tokens(device_hour_usd: float, num_devices: int, monthly_hours: float,
                        closed_usd_per_m: float, open_usd_per_m: float) -> float | None:
    """Output tokens per month (millions) above which self-hosting is cheaper; None: never.

    Self-hosting costs C = device_hour_usd x num_devices x monthly_hours a month for any volume
    up to its capacity K = tokens/s x 3600 x monthly_hours / 1e6 (M tokens); the API costs V x p
    for V M tokens at p USD per 1M. They are equal at V* = C / p. That volume is only reachable
    when V* <= K, i.e. C / p <= K, i.e. C / K <= p, and C / K is exactly the open model's cost per
    1M tokens at full use (device_hour_usd x num_devices / (tokens/s x 3600) x 1e6). So: when
    open_usd_per_m >= p the API is cheaper at every volume (beyond one deployment's capacity each
    further one costs the same per token at full use), and break-even is "never".
    """
    if closed_usd_per_m <= 0:
        raise ValueError(f"closed price {closed_usd_per_m} USD per 1M must be > 0")
    if open_usd_per_m >= closed_usd_per_m:
        return None
    return monthly_cost_usd(device_hour_usd, num_devices, monthly_hours) / closed_usd_per_m


def best_open(v: Verdict) -> ModelVerdict:
    """The open model a person would switch to: highest win rate, then the cheaper."""
    def key(m: ModelVerdict) -> tuple[float, float]:
        rate = m.win_rate.rate if m.win_rate and not math.isnan(m.win_rate.rate) else -1.0
        return (-rate, m.usd_per_m)
    return sorted(v.open, key=key)[0]


def cost_ratio_text(closed_usd_per_m: float, open_usd_per_m: float) -> str:
    """"1/37 the cost per token" or "3.2x the cost per token"."""
    if open_usd_per_m <= 0:
        return "at no measured cost per token"
    ratio = closed_usd_per_m / open_usd_per_m
    if ratio >= 1:
        return f"at 1/{ratio:.0f} the cost per token" if ratio >= 10 else f"at 1/{ratio:.1f} the cost per token"
    return f"at {1 / ratio:.1f}x the cost per token"


def describe_model(label: str, model: str) -> str:
    return label if label == model else f"{label} ({model})"


def console_line(v: Verdict) -> str:
    """The one line to act on, for the best open model."""
    m = best_open(v)
    assert m.win_rate is not None
    even = ("self-hosting is never cheaper at these prices" if m.break_even_m_tokens is None
            else f"break-even at {m.break_even_m_tokens:,.1f}M tokens/month")
    return (f"{describe_model(m.label, m.model)}: win rate {m.win_rate.rate:.2f} ± {m.win_rate.half_width:.2f} "
            f"vs {v.closed.label} {cost_ratio_text(v.closed.usd_per_m, m.usd_per_m)}; {even}")


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(v: Verdict) -> str:
    """The report: one row per model, then what each column means and the prices used."""
    p, agent = v.closed_price, v.extra.get("agent")
    each = f"one episode of agent `{agent}` each" if agent else "one answer each"
    batch = ("the episodes of all prompts at once (their completion tokens / wall time)" if agent
             else "one batched generate of all prompts")
    lines = [
        f"# Verdict: open models vs {v.closed.label}",
        "",
        f"{v.prompts} held-out prompts, {each}; quality = reward `{v.reward}`; "
        f"win rate from {'the compared rewards' if v.win_from == 'reward' else f'the pairwise reward `{v.win_from}`'}.",
        "",
        "| model | quality ± stderr | win rate vs closed (95% CI) | USD per 1M output tokens | "
        "tokens/s | latency median / p95 (s) | break-even (M tokens/month) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in [v.closed, *v.open]:
        win = ("-" if m.win_rate is None else
               f"{_fmt(m.win_rate.rate, '.3f')} ({_fmt(m.win_rate.low, '.3f')}-{_fmt(m.win_rate.high, '.3f')})")
        even = "-" if m is v.closed else ("never" if m.break_even_m_tokens is None
                                          else f"{m.break_even_m_tokens:,.1f}")
        lines.append(
            f"| {describe_model(m.label, m.model)} | {_fmt(m.quality.mean, '.3f')} ± {_fmt(m.quality.stderr, '.3f')} "
            f"| {win} | {_fmt(m.usd_per_m, '.4f')} | {_fmt(m.tokens_per_s, '.1f')} "
            f"| {_fmt(m.latency.median_s, '.3f')} / {_fmt(m.latency.p95_s, '.3f')} | {even} |")
    lines += [
        "",
        f"**{console_line(v)}**",
        "",
        f"- Closed price: {p['name']}: ${p['prompt_usd_per_m']} input / ${p['completion_usd_per_m']} "
        f"output per 1M tokens, as of {p['date']} (ledger.closed_api_*).",
        f"- Open cost: measured tokens/s of {batch} on our engines x "
        f"${v.device_hour_usd}/h x {v.num_devices} device(s) of kind `{v.device_kind}` "
        "(ledger.device_hour_price, ledger.num_devices): the cost at full use.",
        f"- Break-even: a deployment costs ${monthly_cost_usd(v.device_hour_usd, v.num_devices, v.monthly_hours):,.2f} "
        f"a month ({v.monthly_hours} h); above the volume shown the API would cost more. "
        "\"never\": the open model's cost per token is not below the API's.",
        "- Win rate: per prompt 1 / 0.5 / 0 (or a pairwise judge's score), mean over prompts; 95% CI by "
        "the normal approximation over prompts (rough for few prompts).",
        ("- Latency: single episodes one at a time, each its agent's calls (closed: relayed over HTTP; open: "
         "through the gateway to our engines); the closed episodes are paid on every run (not cached)." if agent else
         "- Latency: single requests one at a time (closed: over HTTP; open: one-prompt generates on our engines)."),
    ]
    m = v.extra.get("machine")
    if isinstance(m, dict):
        load = ", ".join(f"{x:.2f}" for x in m.get("load_average", []))
        lines.append(f"- Open models measured on: {m.get('cpu')}, {m.get('cpu_count')} cores, load average {load} "
                     "(1, 5, 15 min, at the end of the run).")
    missing = [f"{m.label}: {m.quality.missing}" for m in [v.closed, *v.open] if m.quality.missing]
    if missing:
        lines.append(f"- Prompts the quality reward could not score (left out): {', '.join(missing)}.")
    return "\n".join(lines) + "\n"
