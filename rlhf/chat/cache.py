"""On-disk cache of chat-completions answers (teacher, judge, closed model): append-only JSONL keyed by a hash of the request.

An interrupted collection resumes from it without paying twice. Each answer is one line written
with a single write and fsynced, so a crash loses at most the line being written; that partial
last line is cut off when the cache is opened again. It holds model names, hashes and answers,
never request headers. One process writes a cache at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from rlhf.chat.client import ChatAnswer


def request_key(model: str, messages: list[dict[str, str]], sampling: Mapping[str, Any],
                sample: int) -> str:
    """Cache key: the same question asked the same way (and the same sample index) is one answer."""
    blob = json.dumps({"model": model, "messages": messages, "sampling": dict(sampling),
                       "sample": sample}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    """Append-only JSONL of answers by request key. A crash mid-append leaves at most one partial
    last line: it is cut off on open (that answer is asked again). Any other bad line is an error."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, ChatAnswer] = {}
        if self.path.exists():
            self._load()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _load(self) -> None:
        raw = self.path.read_bytes()
        complete_end = raw.rfind(b"\n") + 1  # every whole entry ends with a newline
        if complete_end < len(raw):
            print(f"{self.path}: dropping a partial last line ({len(raw) - complete_end} bytes) "
                  "left by an interrupted run")
            with open(self.path, "r+b") as f:
                f.truncate(complete_end)
        for lineno, line in enumerate(raw[:complete_end].decode().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self.entries[entry["key"]] = ChatAnswer(**entry["answer"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path} line {lineno}: not a cache entry ({e})") from e

    def get(self, key: str) -> ChatAnswer | None:
        return self.entries.get(key)

    def put(self, key: str, answer: ChatAnswer, model: str) -> None:
        line = json.dumps({"key": key, "model": model, "answer": answer.__dict__}, ensure_ascii=False)
        # One write of one whole line, then fsync: a crash loses at most this line.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries[key] = answer
