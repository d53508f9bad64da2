"""``math_answer``: 1.0 when the completion's final answer equals the reference answer, else 0.0.

Where the answer is read from (``mode``):

- ``last_number``: the last number in the completion (the arithmetic demo: "3 + 5 = 8");
- ``gsm8k``: the number after ``####``; a completion without one scores 0;
- ``boxed``: the content of the last ``\\boxed{...}``;
- ``tag``: the content of the last ``<answer>...</answer>`` (tag name configurable).

The reference (the ``answer`` column) may be a bare answer or a full GSM8K solution ending in
``#### 42``. Two numbers compare exactly as decimals (``1,000`` == ``1000.0``, ``18`` != ``180``).
Anything else compares as normalised text, or, with ``symbolic: true``, by math-verify
(``\\frac{1}{2}`` == ``0.5``) in a killable child process (see :mod:`rewards.builtin.symbolic`):
a prediction math-verify cannot read scores 0; math-verify crashing or timing out raises.
A row without a reference answer is an error (counted as a failure), not a 0.
"""

from __future__ import annotations

from rewards.answers import gsm8k_answer, last_boxed, last_number, parse_number, tagged
from rewards.builtin.symbolic import SymbolicChecker

MODES = ("last_number", "gsm8k", "boxed", "tag")


class MathAnswer:
    def __init__(self, mode: str = "last_number", symbolic: bool = False, timeout_s: float = 5.0,
                 tag: str = "answer"):
        if mode not in MODES:
            raise ValueError(f"math_answer: mode={mode!r} is not one of {list(MODES)}")
        self.mode = mode
        self.tag = tag
        self._checker = SymbolicChecker(timeout_s) if symbolic else None

    def __call__(self, prompts: list[str], completions: list[str], answer: list | None = None) -> list[float]:
        if answer is None:
            raise ValueError("math_answer needs an `answer` column (data.answer_column)")
        return [self.score_one(p, c, answer=a) for p, c, a in zip(prompts, completions, answer)]

    def score_one(self, prompt: str, completion: str, answer: object = None) -> float:
        if answer is None or str(answer).strip() == "":
            raise ValueError(f"math_answer: no reference answer for prompt {prompt[:80]!r}")
        pred = self.extract(completion)
        if pred is None:
            return 0.0
        return 1.0 if self.equal(reference_answer(str(answer)), pred) else 0.0

    def extract(self, completion: str) -> str | None:
        """The completion's final answer as written, or None when there is none."""
        if self.mode == "gsm8k":
            return gsm8k_answer(completion)
        if self.mode == "last_number":
            return last_number(completion)
        if self.mode == "boxed":
            return last_boxed(completion)
        return tagged(completion, self.tag)

    def equal(self, gold: str, pred: str) -> bool:
        g, p = parse_number(gold), parse_number(pred)
        if g is not None and p is not None:
            return g == p
        if self._checker is not None:
            return self._checker.equivalent(gold, pred)
        return _normalise(gold) == _normalise(pred)

    def close(self) -> None:
        if self._checker is not None:
            self._checker.close()


def reference_answer(answer: str) -> str:
    """The final answer in a reference: after ``####``, inside ``\\boxed{}``, or the text itself."""
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip()
    return last_boxed(answer) or answer.strip()


def _normalise(text: str) -> str:
    return "".join(text.split()).strip("$.").lower()
