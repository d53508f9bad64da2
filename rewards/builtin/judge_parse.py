"""Reading a judge's reply, and turning verdicts into rewards: pure functions, no I/O.

Pointwise: the score is the last ``Score: N`` of the reply (or ``{"score": N}`` when the reply is
structured JSON), normalised from ``[lo, hi]`` to [0, 1]; unparsable or out of range is None.
Pairwise: the verdict is the last ``Verdict: A|B|tie`` (or ``{"verdict": ...}``); the completion is
asked about in both orders, first as A and then as B, and its reward is the mean of the two
outcomes (win 1, tie 0.5, loss 0), so a judge that always prefers the first text scores 0.5.
"""

from __future__ import annotations

import json
import re

_SCORE = re.compile(r"score\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_VERDICT = re.compile(r"verdict\s*[:=]\s*\**\s*\[?\s*(A|B|tie)\b", re.IGNORECASE)
VERDICTS = ("A", "B", "tie")


def _json_field(reply: str, key: str) -> object:
    try:
        data = json.loads(reply.strip())
    except ValueError:
        return None
    return data.get(key) if isinstance(data, dict) else None


def parse_score(reply: str, structured: bool = False) -> float | None:
    """The judge's score, or None when the reply has none.

    >>> parse_score("Clear and correct. Score: 3 ... no wait, Score: 4")
    4.0
    >>> parse_score('{"score": 7}', structured=True), parse_score("looks fine")
    (7.0, None)
    """
    if structured:
        value = _json_field(reply, "score")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value)
    found = _SCORE.findall(reply)
    return float(found[-1]) if found else None


def normalise(score: float | None, lo: float, hi: float) -> float | None:
    """``score`` mapped from [lo, hi] to [0, 1]; None outside the scale (the judge broke the rubric).

    >>> normalise(4, 1, 5), normalise(6, 1, 5)
    (0.75, None)
    """
    if score is None or not lo <= score <= hi:
        return None
    return (score - lo) / (hi - lo)


def parse_verdict(reply: str, structured: bool = False) -> str | None:
    """"A", "B" or "tie" (the last one the reply states), or None.

    >>> parse_verdict("A is wordier. Verdict: b"), parse_verdict('{"verdict": "tie"}', structured=True)
    ('B', 'tie')
    """
    if structured:
        value = _json_field(reply, "verdict")
        found = [value] if isinstance(value, str) else []
    else:
        found = _VERDICT.findall(reply)
    if not found:
        return None
    v = found[-1].strip()
    return "tie" if v.lower() == "tie" else v.upper() if v.upper() in ("A", "B") else None


def outcome(verdict: str, completion_is: str) -> float:
    """1 when the verdict picks the completion's position, 0.5 for a tie, 0 when it picks the other."""
    if verdict == "tie":
        return 0.5
    return 1.0 if verdict == completion_is else 0.0


def pairwise_reward(completion_first: str | None, completion_second: str | None) -> float | None:
    """Mean outcome over the two orders: the completion as A (first), then as B (second).

    >>> pairwise_reward("A", "B")   # wins both ways: 1
    1.0
    >>> pairwise_reward("A", "A")   # always the first text: position bias, (1 + 0) / 2
    0.5
    >>> pairwise_reward("tie", "A") # (0.5 + 0) / 2
    0.25
    """
    if completion_first is None or completion_second is None:
        return None
    return (outcome(completion_first, "A") + outcome(completion_second, "B")) / 2


def inconsistent(completion_first: str | None, completion_second: str | None) -> bool:
    """The two orders disagree about the same pair (the judge followed the position, not the text)."""
    if completion_first is None or completion_second is None:
        return False
    return outcome(completion_first, "A") != outcome(completion_second, "B")


def weighted_mean(scores: list[float | None], weights: list[float]) -> float | None:
    """Criteria combined: sum(w * s) / sum(w); None when any criterion is None.

    >>> weighted_mean([1.0, 0.5], [1.0, 3.0])   # (1 + 1.5) / 4
    0.625
    """
    if any(s is None for s in scores):
        return None
    return sum(w * s for w, s in zip(weights, scores)) / sum(weights)


def score_schema(lo: float, hi: float) -> dict:
    """The response_format a structured pointwise judge is asked for."""
    return {"type": "json_schema", "json_schema": {"name": "judge_score", "strict": True, "schema": {
        "type": "object", "properties": {"score": {"type": "number", "minimum": lo, "maximum": hi}},
        "required": ["score"], "additionalProperties": False}}}


def verdict_schema() -> dict:
    """The response_format a structured pairwise judge is asked for."""
    return {"type": "json_schema", "json_schema": {"name": "judge_verdict", "strict": True, "schema": {
        "type": "object", "properties": {"verdict": {"type": "string", "enum": list(VERDICTS)}},
        "required": ["verdict"], "additionalProperties": False}}}
