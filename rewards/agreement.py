"""How far two rewards agree on the same completions (``reward.agreement``): a judge checked against
a programmatic reward where a task has both. Pure arithmetic.

Over the completions both scored: ``agree`` is the fraction where both call it a pass or both a
fail (value >= 0.5), ``pearson`` the correlation of the values (NaN when fewer than two pairs or
either side is constant: undefined, not 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

PASS = 0.5


@dataclass(frozen=True)
class Agreement:
    agree: float  # NaN when no completion was scored by both
    pearson: float
    pairs: int  # completions both scored


def agreement(a: Sequence[float | None], b: Sequence[float | None]) -> Agreement:
    """
    >>> agreement([1.0, 0.0, 1.0, None], [1.0, 1.0, 1.0, 0.0])   # 2 of the 3 pairs agree
    Agreement(agree=0.6666666666666666, pearson=nan, pairs=3)
    """
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return Agreement(math.nan, math.nan, 0)
    agree = sum((x >= PASS) == (y >= PASS) for x, y in pairs) / len(pairs)
    return Agreement(agree, pearson([x for x, _ in pairs], [y for _, y in pairs]), len(pairs))


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson's r; NaN when undefined (fewer than two values, or either side constant).

    >>> pearson([0.0, 1.0, 2.0], [1.0, 3.0, 5.0]), pearson([0.0, 1.0], [1.0, 0.0])
    (1.0, -1.0)
    """
    n = len(xs)
    if n < 2:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return math.nan
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)
