"""Observation turns as token ids, appended to what the engine sampled (never a re-render).

Re-rendering a conversation from text after each turn re-tokenises the model's own tokens, which
can shift them (a merge across a turn boundary) and misalign the loss mask. Here the model's
sampled ids are kept as they are, and only what comes after them is tokenised, once:

- the rest of the assistant turn's closing (``<|im_end|>\\n`` in ChatML: the model usually
  sampled ``<|im_end|>`` itself, the newline is added),
- the observation turn and the next generation prompt (``<|im_start|>tool\\n{obs}<|im_end|>\\n
  <|im_start|>assistant\\n``), read off the chat template as the text it adds after a closed
  assistant turn.

Without a chat template the observation is plain text between newlines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_SENTINEL = "\u2063SENTINEL\u2063"  # a string no template writes itself


@dataclass(frozen=True)
class Observation:
    ids: list[int]  # every id appended after the model's turn (closing + observation + prompt)
    text: str  # the observation's content as the model sees it (after truncation)
    truncated: bool  # the content was cut to max_tool_tokens


class TurnCodec:
    """Token ids of observation turns for one tokenizer and observation role."""

    def __init__(self, tokenizer: Any, role: str = "tool", max_tool_tokens: int = 256) -> None:
        self.tokenizer = tokenizer
        self.role = role
        self.max_tool_tokens = max_tool_tokens
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        if self.templated:
            user = [{"role": "user", "content": "Hi"}]
            turn = user + [{"role": "assistant", "content": _SENTINEL}]
            closed = tokenizer.apply_chat_template(turn, tokenize=False)
            self._closed = closed
            self.close_text = closed[closed.rindex(_SENTINEL) + len(_SENTINEL):]
            self._turn = turn
            opened = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            plain = tokenizer.apply_chat_template(user, tokenize=False)
            self.generation_prompt = self.encode(opened[len(plain):]) if opened.startswith(plain) else []
        else:
            self.close_text, self.generation_prompt = "\n", []
        self.close_ids = self.encode(self.close_text)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _content(self, text: str) -> tuple[str, bool]:
        ids = self.encode(text)
        if len(ids) <= self.max_tool_tokens:
            return text, False
        return self.tokenizer.decode(ids[: self.max_tool_tokens]), True

    def _turn_text(self, content: str) -> str:
        """The observation turn and the next generation prompt, as the template writes them."""
        if not self.templated:
            return content + "\n"
        full = self.tokenizer.apply_chat_template(
            self._turn + [{"role": self.role, "content": content}], tokenize=False, add_generation_prompt=True)
        if not full.startswith(self._closed):
            raise ValueError("the chat template renders earlier turns differently once a turn follows "
                             "them, so an observation cannot be appended as ids alone")
        return full[len(self._closed):]

    def after_action(self, action_ids: list[int], text: str) -> Observation:
        """What follows a model turn ending in ``action_ids``: its closing, then the observation."""
        content, truncated = self._content(text)
        close = self.close_ids
        if close and action_ids and action_ids[-1] == close[0]:
            close = close[1:]  # the model closed its turn itself (EOS): add only the rest
        return Observation(close + self.encode(self._turn_text(content)), content, truncated)

    def into_prompt(self, prompt_ids: list[int], text: str) -> tuple[list[int], Observation]:
        """A first observation (from reset) added to a prompt as a turn of its own: the prompt's
        generation prompt moves after it. Returns (new prompt ids, the observation)."""
        content, truncated = self._content(text)
        g = len(self.generation_prompt)
        base = prompt_ids[:-g] if g and prompt_ids[-g:] == self.generation_prompt else prompt_ids
        obs = Observation(self.encode(self._turn_text(content)), content, truncated)
        return base + obs.ids, obs
