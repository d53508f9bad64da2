"""A chat request's messages and tools in a normal form, so two calls of one episode compare equal
when they say the same thing however the client spelt it (content as text or parts, None or "",
tool-call arguments as JSON with any spacing or key order, extra fields like ``refusal``).

Pure functions, no tokenizer: bad shapes are 400 errors naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from rollouts.gateway.errors import bad_request

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    """One message as compared and rendered: tool calls as (name, canonical JSON arguments)."""

    role: str
    content: str
    tool_calls: tuple[tuple[str, str], ...] = ()
    tool_call_id: str | None = None


def content_text(content: Any, where: str) -> str:
    """Text of a message's content: a string, None (""), or a list of text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(f"{where}[{j}] is a {kind!r} part; only text parts are served", f"{where}[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{where} is {type(content).__name__}; expected a string, null or a list of text parts", where)


def canonical_arguments(arguments: Any) -> str:
    """Tool-call arguments as canonical JSON (sorted keys, no spacing); text that is not JSON as it is."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def normalise(messages: Any) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} is {type(m).__name__}, not a message object", where)
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role is {role!r}; expected one of {list(ROLES)}", f"{where}.role")
        calls = []
        for j, call in enumerate(m.get("tool_calls") or ()):
            fn = call.get("function") if isinstance(call, dict) else None
            if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
                raise bad_request(f"{where}.tool_calls[{j}] needs function.name", f"{where}.tool_calls[{j}]")
            calls.append((fn["name"], canonical_arguments(fn.get("arguments", {}))))
        tool_call_id = m.get("tool_call_id")
        if tool_call_id is not None and not isinstance(tool_call_id, str):
            raise bad_request(f"{where}.tool_call_id must be a string", f"{where}.tool_call_id")
        out.append(Message(role, content_text(m.get("content"), f"{where}.content"), tuple(calls), tool_call_id))
    return out


def tools_of(body: dict) -> list[dict] | None:
    """The request's tools as the chat template takes them (function schemas); None: no tools."""
    tools = body.get("tools")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise bad_request("tools must be a list of function tools", "tools")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not (isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(fn, dict)
                and isinstance(fn.get("name"), str)):
            raise bad_request(f"tools[{i}] is not a function tool with a name", f"tools[{i}]")
    return [{"type": "function", "function": t["function"]} for t in tools]


def tools_key(tools: list[dict] | None) -> str:
    return json.dumps(tools, sort_keys=True)


def template_message(m: Message, raw: str | None) -> dict[str, Any]:
    """What the chat template is given for ``m``. ``raw``: the text the model sampled when ``m`` is
    a reply this gateway returned (a template that ignores tool_calls still shows the call then)."""
    if raw is not None:
        return {"role": "assistant", "content": raw}
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"type": "function", "function": {"name": n, "arguments": _loads(a)}}
                             for n, a in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _loads(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
