"""``code_exec``: the fraction of a row's tests that the completion's code passes.

The code is the completion's last fenced block (```python ... ```), else the whole completion. It
runs in :mod:`rewards.sandbox` (time and memory limits, no network, a throw-away directory, an
empty environment), then each test from the ``tests`` column runs in the code's namespace. A test
that fails, a crash, a timeout or a memory blow-up all count as failed tests: that is the code's
fault and scores low, not None. The sandbox failing before the code ran (``SandboxError``) and a row
without tests are errors (counted as failures, the sample left out), not a 0.

The ``tests`` column holds a list of Python snippets (``"assert add(2, 3) == 5"``), or one string:
a JSON list of them, or a single snippet.
"""

from __future__ import annotations

import json

from rewards.api import per_sample
from rewards.sandbox import SandboxLimits, extract_code, run_tests


@per_sample
def code_exec(prompt: str, completion: str, tests: list[str] | str | None = None, time_s: float = 5.0,
              memory_mb: int = 512) -> float:
    if tests is None:
        raise ValueError("code_exec needs a `tests` column (add it to data.reward_columns)")
    cases = _as_list(tests)
    if not cases:
        raise ValueError(f"code_exec: empty test list for prompt {prompt[:80]!r}")
    limits = SandboxLimits(time_s=time_s, memory_mb=memory_mb)
    return run_tests(extract_code(completion), cases, limits).fraction


def _as_list(tests: list[str] | str) -> list[str]:
    if isinstance(tests, str):
        try:
            parsed = json.loads(tests)
        except ValueError:
            return [tests]
        return [str(t) for t in parsed] if isinstance(parsed, list) else [tests]
    return [str(t) for t in tests]
