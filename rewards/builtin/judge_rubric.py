"""Judge rubrics: template files with ``{placeholder}`` slots, checked once and rendered per sample.

A rubric is the text of the judge's one user message. Slots are ``{name}`` with ``name`` an
identifier; every other brace is literal, so a rubric can show the judge a JSON example
(``{"score": 7}``) without escaping. ``rubric`` names a file path, or a shipped rubric in
rewards/rubrics/ by its file name with or without ``.txt``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from rlhf.config import ConfigError

SHIPPED = Path(__file__).resolve().parents[1] / "rubrics"
_SLOT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# The slots each mode fills itself; dataset columns (and `reference`) come on top.
MODE_SLOTS = {"pointwise": ("prompt", "completion"), "pairwise": ("prompt", "first", "second")}


@dataclass(frozen=True)
class Rubric:
    path: Path
    text: str

    @property
    def slots(self) -> list[str]:
        return placeholders(self.text)

    def render(self, values: Mapping[str, object]) -> str:
        """The text with every slot filled; a slot without a value is a KeyError naming the file."""
        def fill(m: re.Match) -> str:
            if m.group(1) not in values:
                raise KeyError(f"{self.path}: no value for placeholder {{{m.group(1)}}}")
            return str(values[m.group(1)])
        return _SLOT.sub(fill, self.text)


def placeholders(text: str) -> list[str]:
    """The slot names of a template, in order of first use.

    >>> placeholders('Q: {prompt} A: {completion} as JSON {"score": N} {prompt}')
    ['prompt', 'completion']
    """
    return list(dict.fromkeys(_SLOT.findall(text)))


def find_rubric(name: str, key: str) -> Path:
    """``name`` as a file path, else a shipped rubric; a ConfigError naming ``key`` otherwise."""
    for path in (Path(name), SHIPPED / name, SHIPPED / f"{name}.txt"):
        if path.is_file():
            return path
    shipped = sorted(p.stem for p in SHIPPED.glob("*.txt"))
    raise ConfigError(f"{key}={name!r}: no such file, and not a shipped rubric (shipped: {shipped})")


def load_rubric(name: str, key: str, allowed: Iterable[str] | None) -> Rubric:
    """Read a rubric and check its slots against ``allowed`` (None: columns unknown, not checked)."""
    path = find_rubric(name, key)
    rubric = Rubric(path, path.read_text(encoding="utf-8"))
    if not rubric.slots:
        raise ConfigError(f"{key}={name!r}: {path} has no placeholder; it would ask the same question "
                          "of every sample")
    if allowed is not None:
        allowed = list(dict.fromkeys(allowed))
        for slot in rubric.slots:
            if slot not in allowed:
                raise ConfigError(f"{key}={name!r}: {path} uses placeholder {{{slot}}}, which nothing fills; "
                                  f"allowed here: {['{' + a + '}' for a in allowed]}")
    return rubric
