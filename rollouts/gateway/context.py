"""The token context of one call: continue the episode's current segment, or start a new one.

A call whose messages are the previous call's messages + the reply as returned + new messages
(the usual agent loop), with the same tools, continues: its context is the segment's prompt and
every id so far, then the appended ids (mask 0): the rest of the assistant turn's closing (as
rollouts/env/chat.py's TurnCodec.after_action adds it) and the tokenisation of the text the chat
template writes after the closed assistant turn. The model's sampled ids are never re-tokenised.
Anything else (history rewritten, a reply edited, tools changed) starts a new segment whose prompt
is the whole conversation rendered and tokenised as prompt data is (rlhf/experience/prompts.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from rollouts.env.chat import TurnCodec
from rollouts.env.tools import with_tools
from rollouts.gateway.messages import Message, template_message


@dataclass(frozen=True)
class PreviousCall:
    """What a continuation is checked against: the last call's messages, tools and reply."""

    messages: list[Message]
    tools_key: str
    reply: Message


@dataclass(frozen=True)
class Plan:
    context_ids: list[int]  # the engine's prompt for this call
    new_segment: bool
    appended: list[int]  # continuing: ids added after the segment's last sampled id (mask 0)


class Renderer:
    """Chat-template rendering and tokenisation for one tokenizer. Fast tokenizers refuse use from two
    threads at once ("Already borrowed"), and the server answers on many, so every call holds a lock."""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the gateway needs a tokenizer with a chat template: chat messages are rendered with it")
        self.tokenizer = tokenizer
        self.close_ids = TurnCodec(tokenizer).close_ids
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        # The template already wrote the special tokens it wants (as prompt data: add_special_tokens=False).
        with self._lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        with self._lock:
            return with_tools(self.tokenizer, messages, tools, add_generation_prompt=add_generation_prompt)

    def plan(self, messages: list[Message], tools: list[dict] | None, tools_key: str, returned: dict[Message, str],
             previous: PreviousCall | None, segment_ids: tuple[list[int], list[int]] | None) -> Plan:
        """The context of a call. ``returned``: replies this episode's gateway returned -> the text
        sampled for them; ``segment_ids``: the current segment's (prompt ids, ids so far)."""
        shown = [template_message(m, returned.get(m)) for m in messages]
        full = self.render(shown, tools, add_generation_prompt=True)
        if previous is not None and segment_ids is not None and self._extends(messages, tools_key, previous):
            through = self.render(shown[: len(previous.messages) + 1], tools, add_generation_prompt=False)
            # A template that renders earlier turns differently once more follow cannot be continued as ids.
            if full.startswith(through):
                prompt_ids, ids = segment_ids
                close = self.close_ids
                if close and ids and ids[-1] == close[0]:
                    close = close[1:]  # the model closed its turn itself (EOS): add only the rest
                appended = close + self.encode(full[len(through):])
                return Plan(prompt_ids + ids + appended, False, appended)
        return Plan(self.encode(full), True, [])

    @staticmethod
    def _extends(messages: list[Message], tools_key: str, previous: PreviousCall) -> bool:
        n = len(previous.messages)
        return (tools_key == previous.tools_key and len(messages) > n
                and messages[:n] == previous.messages and messages[n] == previous.reply)
