"""A pairwise reward for the verdict's tests, plugged in by file path: it reads the closed model's
answer (the `closed_answer` column rlhf.compare adds), as a pairwise judge with
reference_column=closed_answer would."""

from __future__ import annotations


def longer_than_closed(prompts, completions, closed_answer):
    """1 when the answer has more characters than the closed one, 0.5 as many, 0 fewer."""
    return [1.0 if len(c) > len(r) else 0.5 if len(c) == len(r) else 0.0
            for c, r in zip(completions, closed_answer)]
