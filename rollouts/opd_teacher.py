"""The teacher of on-policy distillation: an open model on vLLM engines of its own, scoring the
student's sampled tokens (rlhf/algo/distill.py turns the scores into per-token advantages).

Closed APIs do not return log-probs of arbitrary tokens, so the teacher is a model we serve: a
second EngineGroup (its own model, dtype, tensor parallelism and placement, ``teacher.engines``)
that returns each completion token's log-prob given everything before it, in one batched prefill per
engine (vLLM's prompt log-probs: log_softmax of the raw logits, temperature 1 and untruncated
whatever the sampling parameters or logprobs_mode, as vllm/v1/worker/gpu_model_runner.py
``_get_prompt_logprobs_dict`` computes them; the student's side is taken the same way, see
rlhf/algo/distill.py). A request with prompt log-probs does not read vLLM's prefix cache
(``SamplingParams.skip_reading_prefix_cache`` defaults to true for it), so n samples of one prompt
are each scored from the first token. Teacher and student log-probs are only comparable over one
vocabulary, so ``check_same_tokenizer`` refuses a pair whose tokenizers map any id differently,
before any engine starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from rlhf.config import TeacherConfig
from rlhf.types import Completion
from rollouts.group import EngineGroup

if TYPE_CHECKING:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

_SHOWN = 5  # differing ids listed in a mismatch error


class TokenizerMismatchError(ValueError):
    """Teacher and student tokenizers differ; the message lists the first differing ids."""


def _token(by_id: dict[int, str], i: int) -> str:
    return repr(by_id[i]) if i in by_id else "(none)"


def check_same_tokenizer(student, teacher, student_name: str, teacher_name: str,
                         samples: Sequence[str] = ()) -> None:
    """Raise TokenizerMismatchError unless ``student`` and ``teacher`` (transformers tokenizers) map
    every id to the same token, agree on the end-of-sequence id, and encode ``samples`` (e.g. a few
    training prompts) to the same ids."""
    s_by_id = {i: t for t, i in student.get_vocab().items()}
    t_by_id = {i: t for t, i in teacher.get_vocab().items()}
    ids = sorted(set(s_by_id) | set(t_by_id))
    differ = [i for i in ids if s_by_id.get(i) != t_by_id.get(i)]
    where = f"teacher {teacher_name} and student {student_name}"
    why = "on-policy distillation compares the two models' log-probs of the same token ids"
    if differ:
        shown = "; ".join(f"id {i}: student {_token(s_by_id, i)}, teacher {_token(t_by_id, i)}" for i in differ[:_SHOWN])
        raise TokenizerMismatchError(
            f"{where} have different tokenizers: {len(differ)} of {len(ids)} token ids differ "
            f"(student vocabulary {len(s_by_id)}, teacher {len(t_by_id)}); first: {shown}. {why}, so "
            "the teacher must use the student's tokenizer"
        )
    if student.eos_token_id != teacher.eos_token_id:
        raise TokenizerMismatchError(
            f"{where}: end-of-sequence ids differ (student {student.eos_token_id}, teacher "
            f"{teacher.eos_token_id}); {why}"
        )
    for k, text in enumerate(samples):
        a, b = student(text)["input_ids"], teacher(text)["input_ids"]
        if a != b:
            pos = next((p for p, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise TokenizerMismatchError(
                f"{where} encode sample {k} ({text[:60]!r}) differently from token {pos}: student ids "
                f"{a[pos:pos + _SHOWN]}, teacher ids {b[pos:pos + _SHOWN]}; {why}"
            )


@dataclass(frozen=True)
class TeacherScores:
    """What one scoring call cost: sequences, tokens prefilled (prompt + completion) and seconds."""

    sequences: int
    tokens: int
    seconds: float


class TeacherEngines:
    """The teacher model's vLLM engines (an EngineGroup of Ray actors) as a scorer of completions."""

    def __init__(self, group: EngineGroup) -> None:
        self.group = group

    @classmethod
    def start(cls, cfg: TeacherConfig, model_path: str, logs: Path | None = None,
              placement: Sequence[PlacementGroupSchedulingStrategy] | None = None) -> TeacherEngines:
        """``teacher.engines.num_engines`` engines serving ``model_path``, started together."""
        return cls(EngineGroup(cfg.engines, model_path, cfg.dtype, cfg.trust_remote_code, logs,
                               placement=placement, role="teacher"))

    def score(self, completions: list[Completion]) -> TeacherScores:
        """Set every completion's ``teacher_logprobs``: the teacher's log-prob of each completion token
        given its prompt and the tokens before it (observation tokens of multi-turn completions are
        scored too; the loss mask drops them)."""
        start = time.perf_counter()
        sequences = [c.prompt_ids + c.completion_ids for c in completions]
        scores = self.group.score(sequences, [len(c.prompt_ids) for c in completions])
        for c, row in zip(completions, scores, strict=True):
            if len(row) != len(c.completion_ids):
                raise RuntimeError(f"teacher returned {len(row)} log-probs for {len(c.completion_ids)} tokens")
            c.teacher_logprobs = row
        return TeacherScores(len(sequences), sum(len(s) for s in sequences), time.perf_counter() - start)

    def nodes(self) -> list:
        return self.group.nodes()

    @property
    def num_engines(self) -> int:
        return self.group.num_engines

    def shutdown(self) -> None:
        self.group.shutdown()
