"""Environments for the tests, loaded by file path like a user's (env.name=tests/support/envs.py:Name)."""

from __future__ import annotations

import threading
import time

from rlhf.types import Completion, RolloutBatch


class Guess:
    """The README's example, as written there: rewards only success (no step ever returns 0)."""

    def __init__(self, tries_note: str = "try again"):
        self.note = tries_note

    def reset(self, item):
        self.answer = item["answer"]
        return None

    def step(self, action: str):
        if self.answer in action:
            return None, 1.0, True
        return self.note, None, False


def transcript_has_answer(prompts, completions, answer, transcript):
    """A reward reading the ``transcript`` column: 1.0 where the answer appears anywhere in it."""
    return [float(str(a) in t) for a, t in zip(answer, transcript)]


class ScriptedEngines:
    """Stands in for the engine group where a test needs exact model turns (the environment loop and
    scoring are under test, not sampling): ``turns[t]`` is the text of each live trajectory's turn
    t, in row order. Each turn's ids are its text's and the end-of-turn token, as a model that
    closed its turn samples them."""

    def __init__(self, tokenizer, turns: list[list[str]]) -> None:
        self.tokenizer, self.turns, self.calls = tokenizer, turns, 0

    def generate(self, prompt_ids, sampling, seed=None) -> RolloutBatch:
        texts = self.turns[self.calls]
        self.calls += 1
        rows = [(i, p) for i, p in enumerate(prompt_ids) for _ in range(sampling.n)]
        if len(texts) != len(rows):
            raise AssertionError(f"turn {self.calls - 1}: {len(rows)} live trajectories, {len(texts)} scripted")
        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        out = []
        for (i, p), text in zip(rows, texts):
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos]
            out.append(Completion(i, list(p), ids, [-1.0] * len(ids), "stop", text))
        return RolloutBatch(out, n=sampling.n)


class TwoTurn:
    """Turn 1 gets an observation naming the turn's length; turn 2 ends it with reward 1.0 when the
    model wrote fewer tokens' worth of text in turn 2 than in turn 1 (a reward that varies)."""

    def __init__(self, note: str = "noted") -> None:
        self.note = note
        self.actions: list[str] = []

    def reset(self, item: dict) -> None:
        self.item = item
        return None

    def step(self, action: str):
        self.actions.append(action)
        if len(self.actions) == 1:
            return f"{self.note}: {len(action)} characters", None, False
        return None, float(len(self.actions[1]) < len(self.actions[0])), True


class WithFirstObservation(TwoTurn):
    """Its reset gives the task statement as a first observation (the same for every sample)."""

    def reset(self, item: dict) -> str:
        self.item = item
        return f"Task for: {item['prompt']}"


class StepRaises(TwoTurn):
    def step(self, action: str):
        raise ValueError("the tool broke")


class StepHangs(TwoTurn):
    def step(self, action: str):
        time.sleep(3.0)
        return "late", 1.0, True


class StepBlocks(TwoTurn):
    """Every step waits for the test to set ``release`` (class-wide); ``calls`` counts them."""

    release = threading.Event()
    calls = 0

    def step(self, action: str):
        type(self).calls += 1
        self.release.wait(60)
        return "late", 1.0, True


class StepWrongTypes(TwoTurn):
    def step(self, action: str):
        return {"observation": "a dict is not the API"}


class RewardNotANumber(TwoTurn):
    def step(self, action: str):
        return None, "1.0", True


class ResetRaises(TwoTurn):
    def reset(self, item: dict):
        raise RuntimeError("cannot reset")


class ResetWrongType(TwoTurn):
    def reset(self, item: dict):
        return 42


class ResetDiffers(TwoTurn):
    count = 0

    def reset(self, item: dict):
        ResetDiffers.count += 1
        return f"observation {ResetDiffers.count}"


class AsyncTwoTurn(TwoTurn):
    async def step(self, action: str):
        return TwoTurn.step(self, action)


class LongObservation(TwoTurn):
    def step(self, action: str):
        return "word " * 500, None, False


class NoStep:
    def reset(self, item: dict):
        return None


not_a_class = 3
