"""The verdict's arithmetic (rlhf/run/verdict.py), each figure derived by hand."""

from __future__ import annotations

import math

import pytest

from rlhf.run.ledger import serving_usd_per_m
from rlhf.run.verdict import (Estimate, Latency, ModelVerdict, Verdict, break_even_m_tokens, console_line,
                              cost_ratio_text, estimate, latency, markdown, quantile, win_rate, win_scores)


def test_win_scores_from_compared_rewards():
    # open vs closed per prompt: above -> 1, equal -> 0.5, below -> 0, either unscored -> None.
    assert win_scores([1.0, 0.0, 1.0, 0.0, None, 0.3], [0.0, 0.0, 1.0, 1.0, 1.0, None]) == [
        1.0, 0.5, 0.5, 0.0, None, None]
    with pytest.raises(ValueError, match="3 open scores for 2 closed"):
        win_scores([1.0, 1.0, 1.0], [0.0, 0.0])


def test_win_rate_and_its_normal_interval_by_hand():
    # wins [1, 0.5, 0.5, 0, None]: 4 scored, mean 2/4 = 0.5; deviations 0.5, 0, 0, -0.5 ->
    # sample variance (0.25 + 0.25) / 3 = 1/6; stderr sqrt(1/6 / 4) = sqrt(1/24) = 0.204124;
    # half width 1.959964 x 0.204124 = 0.400076; interval 0.099924 .. 0.900076.
    w = win_rate([1.0, 0.5, 0.5, 0.0, None])
    assert (w.n, w.missing) == (4, 1)
    assert w.rate == 0.5
    assert w.half_width == pytest.approx(1.959963984540054 * math.sqrt(1 / 24), rel=1e-12)
    assert w.half_width == pytest.approx(0.400076, abs=1e-6)
    assert (w.low, w.high) == pytest.approx((0.099924, 0.900076), abs=1e-6)


def test_win_rate_interval_is_clipped_to_0_1():
    # [1, 1, 1, 0]: mean 0.75, variance (3 x 0.0625 + 0.5625) / 3 = 0.25, stderr 0.25, half 0.49:
    # 0.26 .. 1.24 -> high clipped to 1.
    w = win_rate([1.0, 1.0, 1.0, 0.0])
    assert w.half_width == pytest.approx(1.959963984540054 * 0.25, rel=1e-12)
    assert w.high == 1.0 and w.low == pytest.approx(0.75 - 0.48999, abs=1e-5)


def test_quality_estimate_leaves_unscored_prompts_out():
    # [0.2, 0.4, None, 0.9]: mean 1.5/3 = 0.5; deviations -0.3, -0.1, 0.4 -> variance
    # (0.09 + 0.01 + 0.16)/2 = 0.13; stderr sqrt(0.13/3) = 0.208167.
    e = estimate([0.2, 0.4, None, 0.9])
    assert (e.n, e.missing) == (3, 1)
    assert e.mean == pytest.approx(0.5, rel=1e-12)
    assert e.stderr == pytest.approx(math.sqrt(0.13 / 3), rel=1e-12)
    nothing = estimate([None, None])
    assert math.isnan(nothing.mean) and (nothing.n, nothing.missing) == (0, 2)
    assert estimate([0.7]) == Estimate(0.7, 0.0, 1, 0)


def test_median_and_p95_by_hand():
    # sorted 0.1 0.2 0.3 0.4 1.0: median at position 0.5 x 4 = 2 -> 0.3; p95 at 0.95 x 4 = 3.8 ->
    # 0.4 + 0.8 x (1.0 - 0.4) = 0.88.
    lat = latency([0.4, 0.1, 1.0, 0.3, 0.2])
    assert lat.median_s == pytest.approx(0.3, rel=1e-12) and lat.p95_s == pytest.approx(0.88, rel=1e-12)
    # even count: [1, 2, 3, 4] median at 1.5 -> 2.5
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert quantile([2.0], 0.95) == 2.0


def test_cost_per_million_tokens_by_hand():
    # one H100 at $2.50/h making 500 tokens/s: 1.8M tokens an hour -> 2.5 / 1.8 = $1.3889 per 1M.
    assert serving_usd_per_m(2.50 * 1, 500.0) == pytest.approx(2.5 / 1.8, rel=1e-12)


def test_break_even_volume_by_hand():
    # 2 devices x $2.50/h x 730 h = $3,650 a month; the API at $10 per 1M output tokens costs that at
    # 3650 / 10 = 365M tokens a month. The open model's cost at full use ($1.39 per 1M) is below $10.
    assert break_even_m_tokens(2.5, 2, 730.0, 10.0, 1.39) == pytest.approx(365.0, rel=1e-12)


def test_break_even_is_never_when_self_hosting_costs_more_per_token():
    # $0.10/h CPU making 2 tokens/s: 0.1 / (2 x 3600) x 1e6 = $13.89 per 1M >= $10: never.
    cpu = serving_usd_per_m(0.10, 2.0)
    assert cpu == pytest.approx(13.888889, rel=1e-6)
    assert break_even_m_tokens(0.10, 1, 730.0, 10.0, cpu) is None
    assert break_even_m_tokens(0.10, 1, 730.0, 10.0, 10.0) is None  # equal: never cheaper
    with pytest.raises(ValueError, match="closed price 0"):
        break_even_m_tokens(0.10, 1, 730.0, 0.0, 1.0)


def _verdict(open_cost: float, even: float | None) -> Verdict:
    lat = Latency(0.5, 0.9, 4)
    closed = ModelVerdict("gpt-4o", "gpt-4o", [1.0, 0.0], [3, 4], estimate([1.0, 0.0]), 10.0, lat)
    tuned = ModelVerdict("tuned", "runs/x/export", [1.0, 1.0], [5, 6], estimate([1.0, 1.0]), open_cost, lat,
                         tokens_per_s=100.0, wins=[0.5, 1.0], win_rate=win_rate([0.5, 1.0]),
                         break_even_m_tokens=even)
    base = ModelVerdict("base", "smollm2", [0.0, 0.0], [5, 6], estimate([0.0, 0.0]), open_cost, lat,
                        tokens_per_s=100.0, wins=[0.5, 0.0], win_rate=win_rate([0.5, 0.0]),
                        break_even_m_tokens=even)
    return Verdict(closed, [base, tuned], "math_answer", "reward",
                   {"name": "gpt-4o", "prompt_usd_per_m": 2.5, "completion_usd_per_m": 10.0, "date": "2026-12-01"},
                   "h100", 1, 2.5, 730.0, 2)


def test_the_console_line_names_the_best_open_model():
    # tuned: wins [0.5, 1] -> 0.75; deviations +-0.25 -> variance 0.125, stderr 0.25, half 0.49.
    # $10 / $0.27 = 37x cheaper; base wins [0.5, 0] -> 0.25, so tuned is named.
    line = console_line(_verdict(10.0 / 37, 182.5))
    assert line == ("tuned (runs/x/export): win rate 0.75 ± 0.49 vs gpt-4o at 1/37 the cost per token; "
                    "break-even at 182.5M tokens/month")
    assert console_line(_verdict(20.0, None)).endswith(
        "at 2.0x the cost per token; self-hosting is never cheaper at these prices")
    assert cost_ratio_text(10.0, 4.0) == "at 1/2.5 the cost per token"


def test_markdown_has_a_row_per_model_and_the_dated_price():
    text = markdown(_verdict(10.0 / 37, 182.5))
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 4  # header + closed + 2 open
    assert "as of 2026-12-01" in text and "| 182.5 |" in text and "| never |" not in text
