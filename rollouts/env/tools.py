"""Tools as plain typed Python functions, and an environment whose actions are tool calls.

A tool is a function with type hints and a Google-style docstring; :func:`tool_schema` derives
the JSON schema chat templates take (``apply_chat_template(..., tools=[schema])``). The model
calls one by writing ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the Hermes /
Qwen format); a turn without a tool call is its final answer.

:class:`ToolEnv` runs such calls: subclass it, list ``tools`` and write ``score(answer, item)``.
A tool that raises, or a call that does not parse, becomes an error observation the model sees,
counted in ``tool_errors`` (env/tool_errors in the metrics); it never stops the run.
"""

from __future__ import annotations

import inspect
import json
import re
import typing
from collections.abc import Callable
from typing import Any

_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}
_CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def tool_schema(fn: Callable) -> dict[str, Any]:
    """The OpenAI-style function schema of ``fn`` from its signature and docstring.

    >>> def add(a: int, b: int) -> int:
    ...     '''Add two integers.
    ...
    ...     Args:
    ...         a: the first
    ...         b: the second
    ...     '''
    ...     return a + b
    >>> tool_schema(add)["function"]["parameters"]["properties"]["a"]
    {'type': 'integer', 'description': 'the first'}
    """
    doc = inspect.getdoc(fn)
    if not doc:
        raise ValueError(f"tool {fn.__name__!r} has no docstring: the model learns what a tool does from it")
    summary, arg_docs = _parse_doc(doc)
    hints = typing.get_type_hints(fn)
    properties, required = {}, []
    for name, p in inspect.signature(fn).parameters.items():
        if name not in hints:
            raise ValueError(f"tool {fn.__name__!r}: parameter {name!r} has no type hint")
        kind = _JSON_TYPES.get(typing.get_origin(hints[name]) or hints[name])
        if kind is None:
            raise ValueError(f"tool {fn.__name__!r}: parameter {name!r} has type {hints[name]!r}; "
                             f"use one of {[t.__name__ for t in _JSON_TYPES]}")
        properties[name] = {"type": kind, "description": arg_docs.get(name, "")}
        if p.default is p.empty:
            required.append(name)
    return {"type": "function", "function": {
        "name": fn.__name__, "description": summary,
        "parameters": {"type": "object", "properties": properties, "required": required}}}


def _parse_doc(doc: str) -> tuple[str, dict[str, str]]:
    """(summary paragraph, {arg: description}) of a Google-style docstring."""
    summary, _, rest = doc.partition("\n\n")
    args: dict[str, str] = {}
    in_args = False
    for line in rest.splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:"):
            in_args = True
        elif in_args and ":" in stripped and not line.startswith(" " * 8):
            name, _, text = stripped.partition(":")
            args[name.strip().split(" ")[0]] = text.strip()
        elif in_args and stripped.endswith(":") and not line.startswith(" "):
            in_args = False
    return " ".join(summary.split()), args


def describe_tools(schemas: list[dict[str, Any]]) -> str:
    """The tools as system-prompt text, for chat templates that have no tool format of their own."""
    listing = "\n".join(json.dumps(s["function"]) for s in schemas)
    return ("You may call these tools:\n<tools>\n" + listing + "\n</tools>\n"
            'To call one, write <tool_call>{"name": <tool name>, "arguments": {<arguments>}}</tool_call> '
            "and wait for its result. When you know the answer, reply without a tool call.")


def with_tools(tokenizer: Any, messages: list[dict], tools: list[dict] | None,
               add_generation_prompt: bool = True) -> str:
    """The chat template's text of ``messages`` with the tools in the template's own tool format; a
    template that has none (it renders the same with and without them, e.g. SmolLM2's) gets them
    described in the system message instead (:func:`describe_tools`). Prompt data and the gateway
    (rollouts/gateway/) both render through here, so a model sees tools the same way in both."""
    plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not tools:
        return plain
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    if text != plain:
        return text
    return tokenizer.apply_chat_template(tools_in_system(messages, tools), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def tools_in_system(messages: list[dict], tools: list[dict]) -> list[dict]:
    """``messages`` with the tools described at the end of the system message (one is added first
    when there is none)."""
    text = describe_tools(tools)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": (messages[0]["content"] or "") + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def parse_tool_call(text: str) -> tuple[str, dict[str, Any]] | None | str:
    """The first tool call in ``text`` as (name, arguments); None when there is none; an error
    message (str) when there is one that does not parse."""
    found = _CALL_RE.search(text)
    if found is None:
        return None
    try:
        call = json.loads(found.group(1).strip())
    except json.JSONDecodeError as e:
        return f"the tool call is not valid JSON ({e.msg})"
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return 'a tool call is {"name": <tool name>, "arguments": {...}}'
    arguments = call.get("arguments", {})
    if not isinstance(arguments, dict):
        return "the tool call's arguments must be a JSON object"
    return call["name"], arguments


class ToolEnv:
    """An environment whose model turns call ``tools`` until one gives a final answer.

    Each turn with a tool call gets the tool's result (or its error) as the observation; the
    first turn without one ends the trajectory, scored by ``score(answer_text, item)``.
    """

    tools: tuple[Callable, ...] = ()

    def __init__(self) -> None:
        self._by_name = {fn.__name__: fn for fn in self.tools}
        self.item: dict[str, Any] = {}
        self.tool_calls = 0
        self.tool_errors = 0

    def reset(self, item: dict[str, Any]) -> str | None:
        self.item = item
        return None

    def step(self, action: str) -> tuple[str | None, float | None, bool]:
        call = parse_tool_call(action)
        if call is None:
            return None, self.score(action, self.item), True
        self.tool_calls += 1
        if isinstance(call, str):
            self.tool_errors += 1
            return f"Error: {call}", None, False
        return self.call_tool(*call), None, False

    def call_tool(self, name: str, arguments: dict[str, Any]) -> str:
        """The tool's result as text, or the error the model sees (an unknown tool, a bad call);
        counted. Also what an application's own tool loop runs (rollouts/env/builtin/calculator_agent.py)."""
        fn = self._by_name.get(name)
        if fn is None:
            self.tool_errors += 1
            return f"Error: no tool named {name!r} (tools: {', '.join(self._by_name)})"
        try:
            return str(fn(**arguments))
        except Exception as e:  # the model's bad call, not our bug: it sees the error and may retry
            self.tool_errors += 1
            return f"Error: {type(e).__name__}: {e}"

    def score(self, answer: str, item: dict[str, Any]) -> float | None:
        raise NotImplementedError(f"{type(self).__name__} must define score(answer, item)")

    def metrics(self) -> dict[str, float]:
        return {"tool_calls": float(self.tool_calls), "tool_errors": float(self.tool_errors)}


def env_tools(cls: type) -> list[dict[str, Any]] | None:
    """The JSON schemas of an environment class's ``tools`` (None: it lists none)."""
    tools = getattr(cls, "tools", None)
    return [tool_schema(fn) for fn in tools] if tools else None
