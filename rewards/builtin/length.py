"""``length``: penalties on completion length.

- ``mode: dapo`` (DAPO's soft overlong punishment, Yu et al. 2025, eq. 13). With
  L_max = ``max_length`` and L_cache = ``cache_length``::

      0                                  if L <= L_max - L_cache
      ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
      -1                                 if L > L_max

- ``mode: linear``: ``-min(L, max_length) / max_length`` (0 for empty, -1 at max_length).

L is counted in ``unit``: ``tokens`` reads the ``completion_length`` column (token counts the
training loop passes from the rollout) or, when a ``tokenizer`` (path or built-in model name) is
given, tokenizes the completion; ``chars`` uses ``len(completion)``.
"""

from __future__ import annotations

from typing import Any


class LengthPenalty:
    def __init__(self, max_length: int, mode: str = "dapo", cache_length: int = 0, unit: str = "tokens",
                 tokenizer: str | None = None):
        if mode not in ("dapo", "linear"):
            raise ValueError(f"length: mode={mode!r} is not one of ['dapo', 'linear']")
        if unit not in ("tokens", "chars"):
            raise ValueError(f"length: unit={unit!r} is not one of ['tokens', 'chars']")
        if max_length < 1:
            raise ValueError(f"length: max_length={max_length} must be >= 1")
        if mode == "dapo" and not 0 < cache_length <= max_length:
            raise ValueError(f"length: cache_length={cache_length} must be in (0, max_length={max_length}]")
        self.mode, self.unit = mode, unit
        self.max_length, self.cache_length = max_length, cache_length
        self._tokenizer: Any = None
        if tokenizer is not None:
            from transformers import AutoTokenizer

            from rlhf.models import resolve_model_path

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer))

    def __call__(self, prompts: list[str], completions: list[str],
                 completion_length: list[int] | None = None) -> list[float]:
        return [self.penalty(n) for n in self.lengths(completions, completion_length)]

    def lengths(self, completions: list[str], completion_length: list[int] | None) -> list[int]:
        if self.unit == "chars":
            return [len(c) for c in completions]
        if self._tokenizer is not None:
            return [len(ids) for ids in self._tokenizer(completions, add_special_tokens=False)["input_ids"]]
        if completion_length is None:
            raise ValueError(
                "length: unit=tokens needs a `completion_length` column (token counts) or a "
                "`tokenizer` kwarg; or set unit=chars"
            )
        return [int(n) for n in completion_length]

    def penalty(self, length: int) -> float:
        if self.mode == "linear":
            return -min(length, self.max_length) / self.max_length
        expected = self.max_length - self.cache_length
        if length <= expected:
            return 0.0
        if length <= self.max_length:
            return (expected - length) / self.cache_length
        return -1.0
