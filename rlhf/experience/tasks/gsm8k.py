"""GSM8K grade-school maths: ``prompt`` (the question), ``answer`` (the final number), ``solution``.

Loaded from a local folder or file (``data.path``: a folder holding train.jsonl / test.jsonl as
in the original release, or one jsonl file) or from the hub (``openai/gsm8k``, config ``main``).
The reference solution ends in ``#### 1,000``; ``answer`` holds that number without separators
("1000"), so exact-match rewards compare numbers, not strings.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from rewards.answers import gsm8k_answer, parse_number

HUB_ID = "openai/gsm8k"
HUB_CONFIG = "main"
_FILES = {"train": "train.jsonl", "test": "test.jsonl"}


def load(path: str | None, split: str) -> datasets.Dataset:
    """``split``: "train" or "test" (GSM8K's held-out split)."""
    if split not in _FILES:
        raise ValueError(f"gsm8k: split={split!r} is not one of {list(_FILES)}")
    if path is None:
        raw = datasets.load_dataset(HUB_ID, HUB_CONFIG, split=split)
    else:
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / _FILES[split]
        if not file.is_file():
            raise FileNotFoundError(f"gsm8k: data.path={path!r}: no file {str(file)!r}")
        raw = datasets.load_dataset("json", data_files=str(file), split="train")
    missing = [c for c in ("question", "answer") if c not in raw.column_names]
    if missing:
        raise ValueError(f"gsm8k ({path or HUB_ID}): columns {missing} missing; it has {raw.column_names}")
    return raw.map(_row, with_indices=True, remove_columns=raw.column_names,
                   desc="gsm8k answers", load_from_cache_file=False)


def final_answer(solution: str) -> str:
    """``"... #### 1,000"`` -> ``"1000"``; ValueError when there is no parsable final answer."""
    found = gsm8k_answer(solution)
    number = parse_number(found) if found is not None else None
    if number is None:
        raise ValueError(f"no '#### <number>' final answer in {solution[-80:]!r}")
    return format(number.normalize(), "f")  # "1000", "2.5": no separators, no trailing zeros


def _row(row: dict, index: int) -> dict:
    try:
        answer = final_answer(row["answer"])
    except ValueError as e:
        raise ValueError(f"gsm8k row {index}: {e}") from None
    return {"prompt": row["question"], "answer": answer, "solution": row["answer"]}
