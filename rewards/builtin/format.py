"""``format``: does the completion follow the required layout?

Two ways to say what is required:

- ``tags`` (default ``["think", "answer"]``): the completion is exactly those tag pairs, in that
  order, each once, with only whitespace around them:
  ``<think>...</think>\\n<answer>...</answer>`` scores 1.0;
- ``pattern``: a regular expression the whole (stripped) completion must match (DOTALL).

With ``partial_credit: true`` and ``tags``, a completion that misses the full layout earns
1/len(tags) for each tag that appears exactly once as a well-formed pair (opened before closed),
wherever it is. An unclosed or repeated tag earns nothing for that tag.

>>> format_reward(["q"], ["<think>2+2</think> <answer>4</answer>"])
[1.0]
>>> format_reward.score_one("q", "<think>2+2</think> <answer>4", partial_credit=True)
0.5
"""

from __future__ import annotations

import re
from typing import Sequence

from rewards.api import per_sample


@per_sample
def format_reward(prompt: str, completion: str, tags: Sequence[str] | None = None,
                  pattern: str | None = None, partial_credit: bool = False) -> float:
    if pattern is not None:
        return 1.0 if re.fullmatch(pattern, completion.strip(), flags=re.DOTALL) else 0.0
    tags = list(tags) if tags is not None else ["think", "answer"]
    if not tags:
        raise ValueError("format: `tags` is empty; give at least one tag or a `pattern`")
    if re.fullmatch(_layout(tuple(tags)), completion, flags=re.DOTALL):
        return 1.0
    if not partial_credit:
        return 0.0
    return sum(_well_formed_once(completion, t) for t in tags) / len(tags)


def _layout(tags: tuple[str, ...]) -> str:
    # Each pair's content may not contain the same tag again (no nesting, no repeats).
    pairs = [rf"<{re.escape(t)}>(?:(?!</?{re.escape(t)}>).)*</{re.escape(t)}>" for t in tags]
    return r"\s*" + r"\s*".join(pairs) + r"\s*"


def _well_formed_once(text: str, tag: str) -> bool:
    opens, closes = text.count(f"<{tag}>"), text.count(f"</{tag}>")
    return opens == 1 and closes == 1 and text.index(f"<{tag}>") < text.index(f"</{tag}>")
