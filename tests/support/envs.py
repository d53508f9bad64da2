"""Environments for the tests, loaded by file path like a user's (env.name=tests/support/envs.py:Name)."""

from __future__ import annotations

import threading
import time


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
