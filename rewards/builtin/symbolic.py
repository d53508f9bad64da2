"""Symbolic answer equivalence through math-verify, in a child process that can be killed.

math-verify guards its sympy work with ``signal.alarm``, which only works on a process's main
thread; rewards run on worker threads. So the comparison runs in a small child process (its own
main thread, where math-verify's alarms work), and the parent adds a hard deadline on top: a
child that overruns is killed and replaced, and the call raises ``TimeoutError``.

What counts as "not equal" and what counts as a failure:

- the prediction holds no expression math-verify can read (the model wrote garbage): not equal,
  ``False`` (the reward scores it 0; that is the model's fault);
- the reference holds no expression math-verify can read: ``RuntimeError`` (a data problem; a 0
  here would mark every completion wrong);
- math-verify raised, or its alarm fired while parsing or comparing: ``RuntimeError`` or
  ``TimeoutError``. By default math-verify swallows both and answers ``[]``/``False``, which would
  score a correct answer 0; it is called with ``raise_on_error=True`` so the runner counts a
  failure and the sample becomes None instead.

Protocol: one JSON line per request on the child's stdin (``[gold, pred, seconds]``), one JSON
line back (``{"equal": bool}``, ``{"error": "..."}`` or ``{"timeout": "..."}``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_STARTUP_S = 60.0  # importing sympy + math-verify in a fresh interpreter (seconds, generous)


class SymbolicChecker:
    def __init__(self, timeout_s: float = 5.0):
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def equivalent(self, gold: str, pred: str) -> bool:
        """Whether ``pred`` equals ``gold`` mathematically (both LaTeX or plain expressions)."""
        with self._lock:
            first = self._proc is None or self._proc.poll() is not None
            if first:
                self._start()
            assert self._proc is not None and self._proc.stdin and self._proc.stdout
            self._proc.stdin.write(json.dumps([gold, pred, self.timeout_s]) + "\n")
            self._proc.stdin.flush()
            # math-verify's alarms cover parsing and comparing separately; allow both, plus start-up.
            deadline = 2 * self.timeout_s + 1.0 + (_STARTUP_S if first else 0.0)
            line = _readline(self._proc, deadline)
            if line is None:
                self._kill()
                raise TimeoutError(f"math-verify gave no answer within {deadline:.1f}s for {pred[:80]!r}")
        reply = json.loads(line)
        where = f"gold={gold[:80]!r} pred={pred[:80]!r}"
        if "timeout" in reply:
            raise TimeoutError(f"math-verify timed out ({self.timeout_s}s alarm) on {where}: {reply['timeout']}")
        if "error" in reply:
            raise RuntimeError(f"math-verify failed on {where}: {reply['error']}")
        return bool(reply["equal"])

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _start(self) -> None:
        env = {"PYTHONPATH": str(_PROJECT_ROOT), "PATH": os.environ.get("PATH", "")}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "rewards.builtin.symbolic"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=env, cwd=str(_PROJECT_ROOT),
        )

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


def _readline(proc: subprocess.Popen, seconds: float) -> str | None:
    """One line from the child's stdout, or None after ``seconds`` (reader thread: pipes block)."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(seconds)
    return box[0] if box and box[0] else None


def _as_latex(text: str) -> str:
    return text if "$" in text or "\\boxed" in text else f"${text}$"


def compare(gold: str, pred: str, seconds: float) -> bool:
    """math-verify's verdict, in the calling process's main thread; raises on its errors and timeouts."""
    from math_verify import parse, verify

    alarm = max(1, math.ceil(seconds))  # signal.alarm takes whole seconds
    gold_parsed = parse(_as_latex(gold), parsing_timeout=alarm, raise_on_error=True)
    if not gold_parsed:
        raise ValueError(f"math-verify finds no expression in the reference answer {gold[:80]!r}")
    # An empty parse of the prediction is a wrong answer, not an error: verify() then says False.
    pred_parsed = parse(_as_latex(pred), parsing_timeout=alarm, raise_on_error=True)
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=alarm, raise_on_error=True))


def _serve() -> None:
    import logging

    from math_verify.errors import TimeoutException

    logging.disable(logging.WARNING)  # math-verify logs parse failures at warning level
    for line in sys.stdin:
        gold, pred, seconds = json.loads(line)
        try:
            reply = {"equal": compare(gold, pred, seconds)}
        except TimeoutException as e:  # a BaseException: `except Exception` would let it end the child
            reply = {"timeout": str(e)}
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
            reply = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
