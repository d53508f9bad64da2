"""The gateway in front of another OpenAI-compatible endpoint instead of our engines: the closed API
a team runs its application on today, for measuring that application against it with the same
agent and rewards (``python -m rlhf.eval trainer.eval_against=closed``).

Episodes, keys, call budgets, errors and the reward POST are the gateway's (server.py); each chat
call is passed on to the endpoint with its own key and model (retries and key redaction are
rlhf/chat/client.py's) and answered with the endpoint's response as it came. The record holds what
the application saw (the transcript, the last reply) and the tokens the endpoint billed; no token
ids (the endpoint keeps them), so nothing here is trainable.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from rlhf.chat.client import ChatClient, Endpoint, EndpointError
from rlhf.config import GatewayConfig
from rollouts.gateway.errors import ApiError, bad_request
from rollouts.gateway.server import Gateway, GatewayMetrics, admit, ended_error
from rollouts.gateway.wire import sse_chunks


class _Unbatched:
    """Relayed calls go out as they come: nothing to batch."""

    def opened(self, key: str) -> None:
        pass

    def closed(self, key: str, error: BaseException) -> None:
        pass

    def stop(self) -> None:
        pass


class RelayGateway(Gateway):
    def __init__(self, endpoint: Endpoint, api_key: str | None, model: str, cfg: GatewayConfig,
                 host: str = "127.0.0.1") -> None:
        """Listens like a Gateway; every call goes to ``endpoint``'s ``model`` with ``api_key``."""
        self.cfg, self.model = cfg, model
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="gateway-relay", daemon=True)
        self._loop_thread.start()
        self.client = ChatClient(endpoint, api_key)
        self._metrics = GatewayMetrics()
        self.batcher = _Unbatched()
        self._listen(cfg, host)

    def shutdown(self) -> None:
        super().shutdown()
        asyncio.run_coroutine_threadsafe(self.client.__aexit__(None, None, None), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def _chat(self, ep, body: Any) -> tuple[int, Any, bool]:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            raise bad_request("the body must be a JSON object with a non-empty messages list", "messages")
        if body.get("n") not in (None, 1):
            raise bad_request(f"n={body.get('n')}: one reply per call (n=1)", "n")
        with ep.call_lock:
            admit(ep)
            # The endpoint's own model; whole replies (a stream is re-sent from the whole reply).
            sent = {k: v for k, v in body.items() if k not in ("stream", "stream_options")} | {"model": self.model}
            label = f"episode {ep.order} call {ep.calls + 1}"
            try:
                data, _ = asyncio.run_coroutine_threadsafe(self.client.post(sent, label), self._loop).result()
            except EndpointError as err:  # after the client's retries: the application sees it as a 502
                raise ApiError(502, "upstream", str(err), type="api_error", code="upstream_error") from None
            message = data["choices"][0].get("message") or {}
            usage = data.get("usage") or {}
            with self._lock:
                if ep.ended:
                    raise ended_error()
                ep.calls += 1
                ep.transcript = [*body["messages"], message]
                ep.final_text = message.get("content") or ""
                ep.add_usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return 200, sse_chunks(data, include_usage), True
        return 200, data, False
