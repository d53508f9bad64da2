"""Rewards for the evaluation tests, plugged in by file path."""

from __future__ import annotations

import math


def every_third_invalid(prompts, completions, **_):
    """1.0 for every completion, except NaN (a counted failure) at batch positions 0, 3, 6, ..."""
    return [math.nan if i % 3 == 0 else 1.0 for i in range(len(completions))]


def needs_solution(prompts, completions, solution):
    """Reads a `solution` column: a config whose data has no such column must be refused."""
    return [float(c == s) for c, s in zip(completions, solution)]
