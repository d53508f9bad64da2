"""The calculator task as an application would write it: an OpenAI tool loop (``agent.name: calculator``).

The same task as the calculator environment (calculator.py beside it), written the way a team's
existing app talks to a chat API: offer ``calculate`` as a tool, call the model, run each tool call it
returns and append the results as ``tool`` messages, until a reply without tool calls (the answer)
or ``max_turns`` model calls. Its reward is the environment's own answer check
(``CalculatorEnv.score``) and its tool runs are the environment's (``ToolEnv.call_tool``), so the two
ways of training on the task differ only in how the rollout is produced: the trainer's turn loop, or
this loop through the gateway (rlhf/experience/agents.py).

It lives here, beside the environment whose tool and answer check it reuses, rather than in a
package of its own: it is an example of user code, and the code it shares is here.
"""

from __future__ import annotations

import json
from typing import Any

from rollouts.env.builtin.calculator import CalculatorEnv, calculate
from rollouts.env.tools import tool_schema

TOOLS = [tool_schema(calculate)]


def calculator_agent(client: Any, row: dict[str, Any], max_turns: int = 3, answer_column: str = "answer",
                     model: str = "policy") -> float | None:
    """One episode: 1.0 when the final reply's answer equals ``row[answer_column]``, else 0.0 (also
    when ``max_turns`` calls end without an answer: a wrong answer, as the environment's unfinished
    episode is); None when the reference cannot be read. ``client``: an ``openai.OpenAI``."""
    env = CalculatorEnv(answer_column)
    messages: list[dict[str, Any]] = [{"role": "user", "content": row["prompt"]}]
    for _ in range(max_turns):
        reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS)
        message = reply.choices[0].message
        if not message.tool_calls:
            return env.score(message.content or "", row)
        messages.append({"role": "assistant", "content": message.content,
                         "tool_calls": [call.model_dump() for call in message.tool_calls]})
        for call in message.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": _run(env, call.function)})
    return 0.0


def _run(env: CalculatorEnv, function: Any) -> str:
    try:
        arguments = json.loads(function.arguments or "{}")
    except json.JSONDecodeError as e:
        return f"Error: the tool call's arguments are not valid JSON ({e.msg})"
    if not isinstance(arguments, dict):
        return "Error: the tool call's arguments must be a JSON object"
    return env.call_tool(function.name, arguments)
