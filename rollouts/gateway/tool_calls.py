"""The model's text as an OpenAI assistant message: tool calls parsed by one of vLLM's tool parsers
(``gateway.tool_parser``; "hermes" reads ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
the format rollouts/env/tools.py describes to the model), never a parser of our own."""

from __future__ import annotations

import secrets
import threading
from typing import Any


def tool_parser_class(name: str) -> type:
    """vLLM's tool parser class named ``name``; a ValueError naming gateway.tool_parser otherwise."""
    from vllm.tool_parsers import ToolParserManager

    try:
        return ToolParserManager.get_tool_parser(name)
    except KeyError:
        raise ValueError(f"gateway.tool_parser={name!r} is not one of vLLM's tool parsers: "
                         f"{sorted(ToolParserManager.list_registered())}") from None


class ReplyFormatter:
    """One parser instance for the gateway; its non-streaming path is used from many threads, so
    calls hold a lock (parsers keep streaming state on the instance)."""

    def __init__(self, name: str, tokenizer: Any) -> None:
        self.parser = tool_parser_class(name)(tokenizer)
        self._lock = threading.Lock()

    def message(self, text: str, finish_reason: str, request: Any) -> tuple[dict, str]:
        """(the assistant message, the finish_reason) for the sampled ``text``. ``request``: vLLM's
        ChatCompletionRequest of the call; tool calls are parsed only when it offers tools and
        tool_choice is not "none", as vLLM's own server does."""
        if not request.tools or request.tool_choice == "none":
            return {"role": "assistant", "content": text}, finish_reason
        with self._lock:
            parsed = self.parser.extract_tool_calls(text, request)
        if not parsed.tools_called:
            return {"role": "assistant", "content": text}, finish_reason
        calls = [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                 for c in parsed.tool_calls]
        return {"role": "assistant", "content": parsed.content or None, "tool_calls": calls}, "tool_calls"
