"""Built-in rewards on hand-made cases, traps included."""

from __future__ import annotations

import pytest

from rewards.answers import gsm8k_answer, last_boxed, last_number, parse_number
from rewards.builtin.format import format_reward
from rewards.builtin.length import LengthPenalty
from rewards.builtin.math_answer import MathAnswer


def score(mode: str, completion: str, answer: str, **kw) -> float:
    m = MathAnswer(mode=mode, **kw)
    try:
        return m.score_one("q", completion, answer=answer)
    finally:
        m.close()


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("3 + 5 = 8", "8", 1.0),
        ("The total is 180.", "18", 0.0),  # 18 vs 180: the whole number is read
        ("The total is 18.", "180", 0.0),
        ("She has 1,000 apples", "1000", 1.0),  # thousands separator
        ("She has 1000 apples", "1,000", 1.0),
        ("That is 1000.00 dollars", "1000", 1.0),
        ("Candidates: 4, 7, 9, 12", "4", 0.0),  # listing many numbers: only the last counts
        ("I first thought 42, but 6 * 7 is actually 41", "42", 0.0),  # right answer only in the reasoning
        ("no digits here", "8", 0.0),
        ("x = -3", "-3", 1.0),
        ("9-3 gives 6", "6", 1.0),  # "9-3" is not "-3"
    ],
)
def test_last_number_mode(completion, answer, expected):
    assert score("last_number", completion, answer) == expected


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("48 / 2 = 24, 48 + 24 = 72\n#### 72", "72", 1.0),
        ("so #### 1,000", "1000", 1.0),
        ("#### $1,000.", "1000", 1.0),
        ("#### 180", "18", 0.0),
        ("the answer is 72", "72", 0.0),  # right number, no marker
        ("#### 5 ... wait #### 7", "7", 1.0),  # the last marker counts
        # A full GSM8K solution as the reference: its "####" part is the answer.
        ("#### 10", "12/60 = 0.2 per minute; 0.2 x 50 = 10\n#### 10", 1.0),
    ],
)
def test_gsm8k_mode(completion, answer, expected):
    assert score("gsm8k", completion, answer) == expected


def test_boxed_and_tag_modes():
    assert score("boxed", r"so \boxed{42}.", "42") == 1.0
    assert score("boxed", r"\boxed{41} hmm \boxed{42}", "42") == 1.0  # the last box
    assert score("boxed", r"\boxed{42", "42") == 0.0  # unclosed
    assert score("boxed", "42", "42") == 0.0  # no box at all
    assert score("tag", "<think>40 + 2</think><answer>42</answer>", "42") == 1.0
    assert score("tag", "<answer>42", "42") == 0.0  # malformed tag
    assert score("tag", "<think>answer 42</think>", "42") == 0.0  # only in the reasoning
    # Without math-verify, non-numbers compare as text (whitespace and case ignored).
    assert score("boxed", r"\boxed{x + 1}", "X+1") == 1.0
    assert score("boxed", r"\boxed{\frac{1}{2}}", "0.5") == 0.0


def test_symbolic_equivalence_through_math_verify():
    m = MathAnswer(mode="boxed", symbolic=True, timeout_s=5)
    try:
        assert m.score_one("q", r"\boxed{\frac{1}{2}}", answer="0.5") == 1.0
        assert m.score_one("q", r"\boxed{\frac{1}{\sqrt{2}}}", answer=r"\frac{\sqrt{2}}{2}") == 1.0
        assert m.score_one("q", r"\boxed{1+x}", answer="x+1") == 1.0
        assert m.score_one("q", r"\boxed{\frac{1}{3}}", answer="0.5") == 0.0
    finally:
        m.close()


def test_symbolic_check_works_off_the_main_thread():
    # math-verify's own timeouts use signal.alarm, which raises off the main thread; ours must not.
    from concurrent.futures import ThreadPoolExecutor

    m = MathAnswer(mode="boxed", symbolic=True)
    try:
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda c: m.score_one("q", c, answer=r"\frac{2}{4}"),
                                [r"\boxed{0.5}", r"\boxed{\frac{1}{2}}", r"\boxed{2}"]))
        assert got == [1.0, 1.0, 0.0]
    finally:
        m.close()


def test_math_verify_timeout_raises_but_an_unreadable_prediction_scores_zero():
    # 9^(9^(9^9)) has about 10^(3.7e8) digits: comparing it with 1/2 runs into math-verify's 1 s
    # alarm (measured: it fires at 1.0 s). Left to itself math-verify answers False to a timeout,
    # which would score 0 here; this must be an error the runner counts.
    m = MathAnswer(mode="boxed", symbolic=True, timeout_s=1)
    try:
        with pytest.raises(TimeoutError, match="math-verify timed out"):
            m.score_one("q", r"\boxed{9^{9^{9^{9}}}}", answer=r"\frac{1}{2}")
        # The same child goes on answering.
        assert m.score_one("q", r"\boxed{0.5}", answer=r"\frac{1}{2}") == 1.0
        # "???" holds no expression: a wrong answer (0), not a failure.
        assert m.score_one("q", r"\boxed{???}", answer=r"\frac{1}{2}") == 0.0
        # A reference with no expression would mark every completion wrong: an error instead.
        with pytest.raises(RuntimeError, match="no expression in the reference"):
            m.score_one("q", r"\boxed{0.5}", answer=r"\boxed{}")
    finally:
        m.close()


def test_math_verify_timeout_becomes_a_counted_none_in_the_runner():
    from rlhf.config import RewardConfig, RewardFnConfig
    from rewards.runner import RewardRunner

    cfg = RewardConfig(functions=[RewardFnConfig(fn="math_answer", kwargs={
        "mode": "boxed", "symbolic": True, "timeout_s": 1})], timeout_s=60)
    completions = [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{0.5}", r"\boxed{???}"]
    with RewardRunner(cfg) as runner:
        got = runner.score(["q"] * 3, completions, {"answer": [r"\frac{1}{2}"] * 3})
    # The timeout is left out (None) and counted; the right answer is 1, the unreadable one 0.
    assert got.per_fn["math_answer"] == [None, 1.0, 0.0]
    assert got.metrics["reward/math_answer/failures"] == 1.0
    assert got.metrics["reward/math_answer/none"] == 0.0  # not a deliberate None


def test_answer_parsing_helpers():
    assert parse_number("1,000") == parse_number("1000") == parse_number("$1,000.00")
    assert parse_number("1,2,3") is None
    assert last_number("1,2,3") == "3"
    assert gsm8k_answer("#### 1,234,567") == "1,234,567"
    assert last_boxed(r"\boxed{\frac{a}{b}}") == r"\frac{a}{b}"


@pytest.mark.parametrize(
    "completion, expected_full, expected_partial",
    [
        ("<think>3 + 5 is 8</think>\n<answer>8</answer>", 1.0, 1.0),
        ("  <think>a</think><answer>8</answer>  ", 1.0, 1.0),
        ("<answer>8</answer><think>a</think>", 0.0, 1.0),  # wrong order; both pairs well formed
        ("<think>a</think>\n<answer>8", 0.0, 0.5),  # answer never closed
        ("<think>a<answer>8</answer>", 0.0, 0.5),  # think never closed
        ("<think>a</think><think>b</think><answer>8</answer>", 0.0, 0.5),  # think twice
        ("</think>a<think><answer>8</answer>", 0.0, 0.5),  # closed before opened
        ("The answer is 8", 0.0, 0.0),
        ("<think>a</think>\n<answer>8</answer> and more text", 0.0, 1.0),  # text after the layout
    ],
)
def test_format_tags(completion, expected_full, expected_partial):
    assert format_reward.score_one("q", completion) == expected_full
    assert format_reward.score_one("q", completion, partial_credit=True) == expected_partial


def test_format_pattern():
    pattern = r"The answer is -?\d+\."
    assert format_reward.score_one("q", "The answer is 8.", pattern=pattern) == 1.0
    assert format_reward.score_one("q", "I think the answer is 8.", pattern=pattern) == 0.0


def test_dapo_overlong_punishment():
    # L_max = 20, L_cache = 5: no penalty up to 15, linear from 0 at 15 to -1 at 20, -1 beyond.
    p = LengthPenalty(max_length=20, cache_length=5, mode="dapo")
    assert p(["q"] * 6, [""] * 6, completion_length=[0, 15, 16, 18, 20, 21]) == [
        0.0, 0.0, -0.2, -0.6, -1.0, -1.0  # (15 - 16) / 5 = -0.2; (15 - 18) / 5 = -0.6
    ]


def test_linear_length_penalty_in_chars():
    p = LengthPenalty(max_length=10, mode="linear", unit="chars")
    # 0/10, 5/10, 10/10, capped at 1.
    assert p(["q"] * 4, ["", "abcde", "a" * 10, "a" * 50]) == [0.0, -0.5, -1.0, -1.0]


def test_length_in_tokens_with_a_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    text = "The answer is 8 because 3 + 5 = 8."
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    p = LengthPenalty(max_length=n, mode="linear", tokenizer=tiny_model_path)
    assert p(["q"], [text]) == [-1.0]  # exactly max_length tokens


def test_length_errors():
    with pytest.raises(ValueError, match="cache_length=0"):
        LengthPenalty(max_length=20, mode="dapo")
    with pytest.raises(ValueError, match="completion_length"):
        LengthPenalty(max_length=20, cache_length=5)(["q"], ["abc"])
