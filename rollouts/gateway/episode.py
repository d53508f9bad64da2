"""One episode's record: its segments of token ids as sampled, and what the application saw.

A segment is one training sample: a prompt and the ids after it, 1 in ``mask`` where the engine
sampled the id (with its log-prob), 0 where the gateway appended it (a tool result, the next
turn's header; log-prob 0.0). An episode whose calls all continue one another is one segment;
each call that does not continue starts another (rollouts/gateway/context.py).
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field

from rlhf.types import Completion, Segment
from rollouts.gateway.context import Plan, PreviousCall
from rollouts.gateway.messages import Message


@dataclass
class SegmentTrace:
    prompt_ids: list[int]
    ids: list[int]
    mask: list[int]  # 1: sampled by the model, 0: appended by the gateway
    logprobs: list[float]  # the sampler's on sampled ids, 0.0 on appended ones
    finish_reason: str  # of the segment's last call
    calls: list[int]  # indices (0-based, in the episode) of the calls it holds


@dataclass
class EpisodeRecord:
    key: str
    calls: int
    segments: list[SegmentTrace]
    final_text: str  # content of the last assistant reply (what reward functions score); "" when none
    transcript: list[dict]  # the last call's messages + the last reply, OpenAI message dicts
    posted_reward: float | None
    reward_posted: bool
    errors: dict[str, int]
    # Tokens over the episode's calls: every call's whole prompt (what an API bills), and its reply.
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_completion(self, prompt_index: int) -> Completion | None:
        """The last segment as the Completion (token_mask None when every id was sampled), the
        earlier ones in ``.segments``; None when the episode made no model call."""
        if not self.segments:
            return None
        *earlier, last = self.segments
        return Completion(
            prompt_index=prompt_index,
            prompt_ids=list(last.prompt_ids),
            completion_ids=list(last.ids),
            logprobs=list(last.logprobs),
            finish_reason=last.finish_reason,
            text=self.final_text,
            token_mask=None if all(last.mask) else list(last.mask),
            segments=[Segment(list(s.prompt_ids), list(s.ids), list(s.logprobs), None if all(s.mask) else list(s.mask))
                      for s in earlier],
        )


@dataclass
class Episode:
    """The gateway's live state of one episode (mutated under the gateway's lock)."""

    key: str
    order: int  # open order: rows of a batch are ordered by it
    seed: int | None
    max_calls: int | None
    calls: int = 0
    segments: list[SegmentTrace] = field(default_factory=list)
    previous: PreviousCall | None = None
    returned: dict[Message, str] = field(default_factory=dict)  # reply as returned -> text sampled
    final_text: str = ""
    transcript: list[dict] = field(default_factory=list)
    posted_reward: float | None = None
    reward_posted: bool = False
    errors: dict[str, int] = field(default_factory=dict)
    ended: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    call_lock: threading.Lock = field(default_factory=threading.Lock)  # held through each of its calls

    def segment_ids(self) -> tuple[list[int], list[int]] | None:
        if not self.segments:
            return None
        return self.segments[-1].prompt_ids, self.segments[-1].ids

    def record_call(self, plan: Plan, sampled: Completion, previous: PreviousCall, raw_text: str,
                    transcript: list[dict], final_text: str) -> bool:
        """Adds a finished call's ids to the episode; True when it started a segment other than the first."""
        index = self.calls
        self.calls += 1
        new = plan.new_segment or not self.segments
        if new:
            self.segments.append(SegmentTrace(list(plan.context_ids), list(sampled.completion_ids),
                                              [1] * len(sampled.completion_ids), list(sampled.logprobs),
                                              sampled.finish_reason, [index]))
        else:
            seg = self.segments[-1]
            seg.ids += plan.appended + sampled.completion_ids
            seg.mask += [0] * len(plan.appended) + [1] * len(sampled.completion_ids)
            seg.logprobs += [0.0] * len(plan.appended) + list(sampled.logprobs)
            seg.finish_reason = sampled.finish_reason
            seg.calls.append(index)
        self.previous = previous
        self.returned[previous.reply] = raw_text
        self.transcript, self.final_text = transcript, final_text
        return new and len(self.segments) > 1

    def add_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def record(self) -> EpisodeRecord:
        """A copy: later calls (refused once ended) never change a record already handed out."""
        return EpisodeRecord(self.key, self.calls, copy.deepcopy(self.segments), self.final_text,
                             copy.deepcopy(self.transcript), self.posted_reward, self.reward_posted, dict(self.errors),
                             self.prompt_tokens, self.completion_tokens)
