"""Finding a final answer in text: GSM8K ``#### 42``, ``\\boxed{...}``, the last number.

Numbers are read as :class:`~decimal.Decimal` so that ``1,000``, ``1000`` and ``1000.00`` compare
equal exactly and ``18`` never matches ``180``. A comma counts as a thousands separator only
between groups of exactly three digits (``1,000,000``); ``1,2,3`` is three numbers.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)"
# A sign only where it cannot be a binary minus ("5-3" is 5 and 3); no number starts inside a
# word ("x2") or right after a digit, so "180" never yields "18".
NUMBER_RE = re.compile(rf"(?<![\w.])(?:(?<![\w)])-)?{_UNSIGNED}")
_GSM8K_RE = re.compile(rf"####\s*\$?\s*(-?{_UNSIGNED})")


def parse_number(text: str) -> Decimal | None:
    """``"1,000"`` -> 1000, ``"$-3.50"`` -> -3.50; None when ``text`` is not one number."""
    cleaned = text.strip().strip("$").strip().rstrip(".")
    if not NUMBER_RE.fullmatch(cleaned):
        return None
    try:
        return Decimal(cleaned.replace(",", ""))
    except InvalidOperation:
        return None


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (as written, e.g. ``"1,000"``), or None."""
    found = NUMBER_RE.findall(text)
    return found[-1] if found else None


def gsm8k_answer(text: str) -> str | None:
    """The number after the last ``####`` (GSM8K's final-answer marker), or None."""
    found = _GSM8K_RE.findall(text)
    return found[-1] if found else None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces balanced), or None if unclosed/absent."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def tagged(text: str, tag: str) -> str | None:
    """The content of the last ``<tag>...</tag>``, or None."""
    found = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None
