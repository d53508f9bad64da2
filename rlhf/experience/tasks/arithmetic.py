"""The arithmetic task: generated problems such as "What is 3 + 5?" with their answers.

The demo's task. SmolLM2-135M-Instruct gets single-digit additions right about a third of the
time, so groups of samples disagree and GRPO has a signal. Operand range, operators and the number
of terms make it harder or easier. The eval problems are distinct from each other and never
appear in train; train problems are drawn (with repetition) from the rest.
"""

from __future__ import annotations

import random

import datasets

from rlhf.config import ArithmeticTaskConfig, ConfigError

OPS = ("+", "-", "*")


def build(cfg: ArithmeticTaskConfig, split: str) -> datasets.Dataset:
    """``split``: "train" or "eval". Columns: prompt (str), answer (str, an integer)."""
    _check(cfg)
    rng = random.Random(cfg.seed)
    held_out: set[str] = set()
    while len(held_out) < cfg.num_eval:
        held_out.add(_draw(cfg, rng))
    if split == "eval":
        exprs = sorted(held_out, key=lambda e: (len(e), e))  # a stable order for evaluation
    elif split == "train":
        exprs = []
        while len(exprs) < cfg.num_train:
            expr = _draw(cfg, rng)
            if expr not in held_out:
                exprs.append(expr)
    else:
        raise ValueError(f"arithmetic task: split={split!r} is not 'train' or 'eval'")
    return datasets.Dataset.from_dict({
        "prompt": [cfg.template.format(expr=e) for e in exprs],
        "answer": [str(evaluate(e)) for e in exprs],
    })


def num_distinct(cfg: ArithmeticTaskConfig) -> int:
    return (cfg.max_operand - cfg.min_operand + 1) ** cfg.num_terms * len(set(cfg.ops)) ** (cfg.num_terms - 1)


def evaluate(expr: str) -> int:
    """Value of ``"a op b op c"`` (tokens separated by single spaces) with * before + and -."""
    tokens = expr.split(" ")
    total, sign, product = 0, 1, int(tokens[0])
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            product *= int(operand)
        else:
            total += sign * product
            sign, product = (1 if op == "+" else -1), int(operand)
    return total + sign * product


def _draw(cfg: ArithmeticTaskConfig, rng: random.Random) -> str:
    parts = [str(rng.randint(cfg.min_operand, cfg.max_operand))]
    for _ in range(cfg.num_terms - 1):
        parts += [rng.choice(cfg.ops), str(rng.randint(cfg.min_operand, cfg.max_operand))]
    return " ".join(parts)


def _check(cfg: ArithmeticTaskConfig) -> None:
    bad_ops = [op for op in cfg.ops if op not in OPS]
    if not cfg.ops or bad_ops:
        raise ConfigError(f"data.arithmetic.ops={list(cfg.ops)}: use a non-empty subset of {list(OPS)}")
    if cfg.min_operand > cfg.max_operand:
        raise ConfigError(
            f"data.arithmetic.min_operand={cfg.min_operand} > data.arithmetic.max_operand={cfg.max_operand}"
        )
    if cfg.num_terms < 2:
        raise ConfigError(f"data.arithmetic.num_terms={cfg.num_terms} must be >= 2")
    if "{expr}" not in cfg.template:
        raise ConfigError(f"data.arithmetic.template={cfg.template!r} has no {{expr}} placeholder")
    if cfg.num_train < 1 or cfg.num_eval < 1:
        raise ConfigError(
            f"data.arithmetic.num_train={cfg.num_train}, num_eval={cfg.num_eval}: both must be >= 1"
        )
    space = num_distinct(cfg)
    # At most half the problems go to eval, so train keeps as many distinct problems as eval has.
    if cfg.num_eval > space // 2:
        raise ConfigError(
            f"data.arithmetic.num_eval={cfg.num_eval} but these settings make only {space} distinct "
            f"problems; use num_eval <= {space // 2} or widen the operand range / ops / num_terms"
        )
