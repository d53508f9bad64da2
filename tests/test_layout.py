"""The floors of the house: imports point down, never up (shared/LAYOUT.md, README "Layout").

Every import between our files is read with ``ast`` (function-local ones included) and each file is
given its floor by the longest prefix in ``FLOORS``; a file may import its own floor or any below.
``python tests/test_layout.py`` prints the counts the closing notes quote.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rlhf", "rollouts", "rewards")

# Longest dotted prefix wins. 0: schema; 1: the shared floor (typed data, naming objects, where a process
# runs, what goes to the terminal, model resolution, the sync wire); 2: components; 3: orchestration;
# 4: preflight; 5: entry points.
FLOORS = {
    "rlhf.config": 0,
    "rlhf": 1,  # rlhf/__init__.py and the shared modules at the top (types, specs, console, ...)
    "rlhf.cluster": 1,
    "rlhf.chat": 1,
    "rlhf.algo": 2,
    "rlhf.learner": 2,
    "rollouts": 2,
    "rewards": 2,
    "rlhf.experience": 3,
    "rlhf.run": 3,
    "rlhf.distill": 3,
    "rlhf.validation": 4,
    "rlhf.plan": 4,
    "rlhf.train": 5,
    "rlhf.eval": 5,
    "rlhf.compare": 5,
    "rlhf.cli": 5,
    "rlhf.distill.sft": 5,
    "rlhf.distill.chain": 5,
}
FLOOR_NAMES = ["schema", "shared", "components", "orchestration", "preflight", "entry points"]


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def arrows() -> set[tuple[str, str]]:
    """(importer, imported) for every import of one of our files by another, function-local ones too."""
    mods = modules()
    found = set()
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                # `from pkg import sub` names the package too: a package is no arrow to its own files
                if target and target != name and not name.startswith(target + "."):
                    found.add((name, target))
    return found


def floor(module: str) -> int:
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[best]


def upward(found: set[tuple[str, str]]) -> list[str]:
    return sorted(f"{a} ({FLOOR_NAMES[floor(a)]}) -> {b} ({FLOOR_NAMES[floor(b)]})"
                  for a, b in found if floor(b) > floor(a))


def test_no_import_runs_up_a_floor():
    assert upward(arrows()) == []


def test_the_schema_imports_nothing_of_ours():
    schema = [b for a, b in arrows() if a == "rlhf.config.schema"]
    assert schema == []


def test_every_file_has_a_floor_and_the_floor_test_can_fail():
    # A made-up arrow from the learner to the loop must be reported.
    assert upward({("rlhf.learner.group", "rlhf.train")}) == [
        "rlhf.learner.group (components) -> rlhf.train (entry points)"]
    assert {floor(m) for m in modules()} <= set(range(len(FLOOR_NAMES)))


if __name__ == "__main__":
    found = arrows()
    top = sorted(p.name for p in (ROOT / "rlhf").glob("*.py"))
    lines = sum(len(p.read_text().splitlines()) for p in (ROOT / "rlhf").rglob("*.py"))
    print(f"rlhf/: {lines} lines; {len(top)} modules at its top: {' '.join(top)}")
    print(f"import arrows between our files: {len(found)}; running up a floor: {len(upward(found))}")
    print("\n".join(upward(found)))
    sys.exit(0)
