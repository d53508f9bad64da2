"""One multi-turn trajectory as token ids, built turn by turn from what the engine sampled.

``ids`` holds every token after the prompt: each model turn's sampled ids exactly as the engine
returned them, then the observation ids appended after it (rollouts/env/chat.py). ``mask`` is 1 on
model tokens and 0 on observation tokens; ``logprobs`` is the sampler's log-prob on model tokens
and 0.0 on observation tokens. A one-turn trajectory is a plain completion (mask all 1).

How it ended (``end``): the environment said done, ``max_turns`` ran out, or the token budget left
no room for another turn. One that ended without the environment's say and without a reward is
*unfinished* (``unfinished``): rlhf/experience/episodes.py scores it ``env.unfinished_reward``, by cause.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from rlhf.types import Completion


@dataclass
class Trajectory:
    prompt_index: int  # index of its prompt in the request
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # model + observation tokens after the prompt
    mask: list[int] = field(default_factory=list)  # 1: model token, 0: observation token
    logprobs: list[float] = field(default_factory=list)  # sampler's on model tokens, 0.0 elsewhere
    pieces: list[str] = field(default_factory=list)  # the text of each model turn and observation
    turns: int = 0  # model turns so far
    finish_reason: str = "stop"  # of the last model turn; "length" when a budget cut it
    done: bool = False
    env_reward: float | None = None  # the sum of the rewards the environment's steps returned
    end: str = "running"  # "done" (the environment said so), "max_turns" or "budget"
    step_errors: int = 0  # steps that raised, overran or found the environment busy
    last_turn: str = ""  # the text of the model's latest turn
    env: object = None  # the environment instance of this trajectory (None: single turn)
    running: threading.Event | None = None  # set when its latest step returned (rlhf/experience/episodes.py)

    def add_action(self, ids: list[int], logprobs: list[float], text: str, finish_reason: str) -> None:
        if len(ids) != len(logprobs):
            raise ValueError(f"a model turn of {len(ids)} tokens came with {len(logprobs)} log-probs")
        self.ids += ids
        self.mask += [1] * len(ids)
        self.logprobs += logprobs
        self.pieces.append(text)
        self.last_turn = text
        self.turns += 1
        self.finish_reason = finish_reason

    def add_observation(self, ids: list[int], text: str) -> None:
        self.ids += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.pieces.append(text)

    def add_reward(self, reward: float | None) -> None:
        if reward is not None:
            self.env_reward = reward if self.env_reward is None else self.env_reward + reward

    def finish(self, end: str) -> None:
        self.done, self.end = True, end

    @property
    def unfinished(self) -> str | None:
        """Why it ended without a reward and without the environment saying done: "errors" when
        every step failed (the model never got a real answer), else "max_turns" or "budget".
        None when it was rewarded or the environment ended it (a done without a reward is the
        environment declining to score: a None reward, not an unfinished episode)."""
        if self.env_reward is not None or self.end in ("done", "running"):
            return None
        return "errors" if self.step_errors == self.turns else self.end

    @property
    def context(self) -> list[int]:
        """What the engine continues from on the next turn: prompt and everything so far."""
        return self.prompt_ids + self.ids

    @property
    def observation_tokens(self) -> int:
        return len(self.mask) - sum(self.mask)

    def to_completion(self) -> Completion:
        """The trajectory as the learner's Completion; ``token_mask`` None when every token is the
        model's (the single-turn case stays exactly a plain completion)."""
        return Completion(
            prompt_index=self.prompt_index,
            prompt_ids=list(self.prompt_ids),
            completion_ids=list(self.ids),
            logprobs=list(self.logprobs),
            finish_reason=self.finish_reason,
            text="".join(self.pieces),
            token_mask=list(self.mask) if 0 in self.mask else None,
        )
