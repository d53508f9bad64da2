"""Agents for the tests, loaded by file path like a user's (agent.name=tests/support/agents.py:name).

Each talks to the gateway with the real openai client it is handed. The tiny random model never
writes a tool call, so the tool-using agent runs the calculator itself after the model's first
reply, appends the result as a tool message (as an app does after a tool call) and calls again.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import urllib.request  # at import, not in an episode's thread: a module half-imported there is seen by the others
from pathlib import Path

from rlhf.experience.agent_api import AgentSpec, play
from rollouts.env.builtin.calculator import calculate
from rollouts.env.tools import tool_schema

TOOLS = [tool_schema(calculate)]
NOT_CALLABLE = 3


def one_argument(client):
    """Wrong signature: an agent is called as agent(client, row, **kwargs)."""


def letter_share(text: str | None) -> float:
    """The reward of the test agents: the share of ASCII letters in the final reply. The tiny random
    model's replies vary in it, so groups have signal."""
    return sum(ch.isascii() and ch.isalpha() for ch in text) / len(text) if text else 0.0


def two_calls(client, row, max_tokens: int = 8) -> float:
    """Two model calls, the second continuing the first with a calculator result between them;
    rewarded by letter_share of the final reply."""
    messages = [{"role": "user", "content": row["prompt"]}]
    first = client.chat.completions.create(model="policy", messages=messages, tools=TOOLS, max_tokens=max_tokens)
    reply = first.choices[0].message
    messages.append({"role": "assistant", "content": reply.content})
    messages.append({"role": "tool", "tool_call_id": "call_0", "content": calculate("12 * 7 + 5")})
    second = client.chat.completions.create(model="policy", messages=messages, tools=TOOLS, max_tokens=max_tokens)
    return letter_share(second.choices[0].message.content)


async def two_calls_async(client, row, max_tokens: int = 8) -> float:
    """two_calls with an openai.AsyncOpenAI client."""
    messages = [{"role": "user", "content": row["prompt"]}]
    first = await client.chat.completions.create(model="policy", messages=messages, tools=TOOLS, max_tokens=max_tokens)
    messages.append({"role": "assistant", "content": first.choices[0].message.content})
    messages.append({"role": "tool", "tool_call_id": "call_0", "content": calculate("12 * 7 + 5")})
    second = await client.chat.completions.create(model="policy", messages=messages, tools=TOOLS, max_tokens=max_tokens)
    return letter_share(second.choices[0].message.content)


def on_node(client, row, log_dir: str) -> float:
    """two_calls, having written the Ray node it runs on into a file of its own under ``log_dir``."""
    import os
    import uuid

    import ray

    Path(log_dir, f"{os.getpid()}-{uuid.uuid4().hex}").write_text(ray.get_runtime_context().get_node_id())
    return two_calls(client, row)


def posts(client, row) -> None:
    """two_calls, its reward posted to the gateway (as an app that learns the outcome later would)
    instead of returned."""
    reward = two_calls(client, row)
    request = urllib.request.Request(f"{str(client.base_url).rstrip('/')}/episodes/reward", method="POST",
                                     data=json.dumps({"reward": reward}).encode(),
                                     headers={"Authorization": f"Bearer {client.api_key}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200, answer.status
    return None


def raises(client, row):
    client.chat.completions.create(model="policy", messages=[{"role": "user", "content": row["prompt"]}], max_tokens=2)
    raise RuntimeError("the application broke")


def hangs(client, row):
    """Calls once, then never returns (within any test's agent.timeout_s)."""
    client.chat.completions.create(model="policy", messages=[{"role": "user", "content": row["prompt"]}], max_tokens=2)
    time.sleep(3600)


def never_calls(client, row) -> float:
    return 1.0


def returns_text(client, row):
    return "1.0"


_started = itertools.count()
SCRIPT = Path(__file__).with_name("agent_script.py")
# What the k-th episode started in this process runs (``dispatch``): PLAN[k] for the first 16 (each
# failure below once or twice), then the three kinds that train, in turn. A run's totals are exact
# whichever batch (step or evaluation) an episode lands in: 3 errors (2 raise, 1 exits 1), 1 timeout,
# 2 that never call the model. The others return their reward, print it (command) or post it (posts).
PLAN = ("two_calls", "two_calls_async", "command", "hangs", "raises", "never_calls", "command_fails", "posts",
        "two_calls", "two_calls_async", "command", "two_calls", "raises", "never_calls", "posts", "two_calls")
LATER = ("two_calls", "two_calls_async", "command", "posts")


def dispatch(client, row) -> float | None:
    """One training run exercises every kind of agent and every way one ends. The async and the
    command agents run through agent_api.play as agent.name / agent.command would, with this
    episode's base URL and key."""
    k = next(_started)
    what = PLAN[k] if k < len(PLAN) else LATER[k % len(LATER)]
    base_url, key = str(client.base_url).rstrip("/"), client.api_key
    if what == "two_calls_async":
        return play(AgentSpec(name=f"{__file__}:two_calls_async", timeout_s=60), base_url, key, row)
    if what in ("command", "command_fails"):
        mode = "calls" if what == "command" else "fail"
        return play(AgentSpec(command=(sys.executable, str(SCRIPT), mode), timeout_s=60), base_url, key, row)
    return globals()[what](client, row)
