"""A scripted OpenAI-compatible judge at http://127.0.0.1:<port>/v1 for the judge reward's tests.

``judge(text)`` decides each chat-completions answer from the user message: a reply string, or
("status", code) to fail, or ("slow", seconds, reply) to answer late. Every POST is counted and
kept; ``GET /v1/models`` lists ``models``. Requests without the expected key get 401.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Callable

from tests.support.json_http import LoopbackServer, send_json

USAGE = (11, 3)  # prompt, completion tokens every successful answer reports


class JudgeServer:
    def __init__(self, key: str, judge: Callable[[str], object], models: tuple[str, ...] = ("judge-x",)):
        self.key, self.judge, self.models = key, judge, models
        self.lock = threading.Lock()
        self.posts: list[dict] = []
        self.seen: dict[str, int] = {}  # user message -> times asked (a 429 once, then fine)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if not self._authorised():
                    return
                if self.path != "/v1/models":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in server.models]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self._authorised():
                    return
                text = body["messages"][-1]["content"]
                with server.lock:
                    server.posts.append(body)
                    server.seen[text] = server.seen.get(text, 0) + 1
                    times = server.seen[text]
                action = server.judge(text) if times > 1 or "flaky" not in text else ("status", 429)
                if isinstance(action, tuple) and action[0] == "status":
                    # A careless server quoting the Authorization header: the client must not pass it on.
                    return self._send(action[1], {"error": {"message": self.headers.get("Authorization")}})
                if isinstance(action, tuple) and action[0] == "slow":
                    time.sleep(action[1])
                    action = action[2]
                p, c = USAGE
                self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": action}}],
                                 "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})

            def _authorised(self) -> bool:
                if self.headers.get("Authorization") != f"Bearer {server.key}":
                    self._send(401, {"error": {"message": "bad key"}})
                    return False
                return True

            def _send(self, code, payload, headers=None):
                send_json(self, code, payload, headers)

        self.http = LoopbackServer(Handler)
        self.base_url = self.http.base_url

    @property
    def requests(self) -> int:
        with self.lock:
            return len(self.posts)

    def close(self) -> None:
        self.http.close()
