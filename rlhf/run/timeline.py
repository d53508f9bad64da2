"""When each phase of a run ran: ``<run>/timeline.jsonl``, one line per span, so the overlap of
generation and training (trainer.max_staleness > 0) can be seen (rlhf/run/plot.py draws it).

A line: {"phase": ..., "step": the step the span belongs to (generate/score/teacher: the step whose
batch it produced), "start": epoch seconds, "end": epoch seconds}. Spans come from the loop's
thread and the producer's, hence the lock. The phases, each also ``timing/<phase>`` in the step's
metrics except save:

- producer: generate, score, teacher (on-policy distillation);
- loop: train (the learner's whole share of a step: reference pass, old log-probs, the engines'
  sleep and wake, the updates), reference (the reference pass within train, algo.kl_coef > 0),
  wait_rollouts (the wait for the batch in flight before the sync), sync, eval, save.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

TIMELINE = "timeline.jsonl"


class Timeline:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / TIMELINE
        self._lock = threading.Lock()
        self._file = self.path.open("a")  # a resumed run appends

    @contextmanager
    def span(self, phase: str, step: int, metrics: dict[str, float] | None = None):
        """Record the block as one span; with ``metrics``, also add its wall time to
        metrics["timing/<phase>"] (a phase may run several times a step)."""
        start, clock = time.time(), time.perf_counter()
        try:
            yield
        finally:
            if metrics is not None:
                key = f"timing/{phase}"
                metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - clock
            line = json.dumps({"phase": phase, "step": step, "start": start, "end": time.time()})
            with self._lock:
                self._file.write(line + "\n")
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_timeline(path: Path) -> list[dict]:
    """Spans in file order; a line cut short by a kill is skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
