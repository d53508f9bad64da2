"""Agents for the tests, loaded by file path like a user's (agent.name=tests/support/agents.py:name).

Each talks to the gateway with the real openai client it is handed. The tiny random model never
writes a tool call, so the tool-using agent runs the calculator itself after the model's first
reply, appends the result as a tool message (as an app does after a tool call) and calls again.
"""

from __future__ import annotations

import itertools
import threading
import time

from rollouts.env.builtin.calculator import calculate
from rollouts.env.tools import tool_schema

TOOLS = [tool_schema(calculate)]
NOT_CALLABLE = 3


def one_argument(client):
    """Wrong signature: an agent is called as agent(client, row, **kwargs)."""


def two_calls(client, row, max_tokens: int = 8) -> float:
    """Two model calls, the second continuing the first with a calculator result between them;
    reward 1.0 when the final reply contains a digit (the tiny model writes some about half the time)."""
    messages = [{"role": "user", "content": row["prompt"]}]
    first = client.chat.completions.create(model="policy", messages=messages, tools=TOOLS, max_tokens=max_tokens)
    reply = first.choices[0].message
    messages.append({"role": "assistant", "content": reply.content})
    messages.append({"role": "tool", "tool_call_id": "call_0", "content": calculate("12 * 7 + 5")})
    second = client.chat.completions.create(model="policy", messages=messages, tools=TOOLS, max_tokens=max_tokens)
    return float(any(ch.isdigit() for ch in second.choices[0].message.content or ""))


async def two_calls_async(client, row, max_tokens: int = 8) -> float:
    """two_calls with an openai.AsyncOpenAI client."""
    messages = [{"role": "user", "content": row["prompt"]}]
    first = await client.chat.completions.create(model="policy", messages=messages, tools=TOOLS, max_tokens=max_tokens)
    messages.append({"role": "assistant", "content": first.choices[0].message.content})
    messages.append({"role": "tool", "tool_call_id": "call_0", "content": calculate("12 * 7 + 5")})
    second = await client.chat.completions.create(model="policy", messages=messages, tools=TOOLS, max_tokens=max_tokens)
    return float(any(ch.isdigit() for ch in second.choices[0].message.content or ""))


def raises(client, row):
    client.chat.completions.create(model="policy", messages=[{"role": "user", "content": row["prompt"]}], max_tokens=2)
    raise RuntimeError("the application broke")


def hangs(client, row, release: threading.Event | None = None):
    """Calls once, then never returns (within any test's agent.timeout_s)."""
    client.chat.completions.create(model="policy", messages=[{"role": "user", "content": row["prompt"]}], max_tokens=2)
    time.sleep(3600)


def never_calls(client, row) -> float:
    return 1.0


def returns_text(client, row):
    return "1.0"


_turn = itertools.count()
# Per started episode, in turn: what the dispatcher runs. Two in eight fail in each way below, so a
# batch of 16 episodes (4 prompts x 4 samples) has 10 that train, whichever rows they land on.
PLAN = ("two_calls", "two_calls", "raises", "hangs", "never_calls", "two_calls", "two_calls", "two_calls")


def dispatch(client, row) -> float | None:
    """One training run exercises every way an agent ends: PLAN[k % 8] for the k-th episode started
    in this process."""
    return globals()[PLAN[next(_turn) % len(PLAN)]](client, row)
