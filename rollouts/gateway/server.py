"""The gateway: an OpenAI-compatible HTTP server whose every API key is one episode.

An application that talks to ``/v1/chat/completions`` is pointed at ``Gateway.base_url`` with an
episode's key (``Gateway.open``); its calls are rendered with the policy's chat template, batched
with every other open episode's into the engines (batcher.py), and recorded token by token
(context.py, episode.py); ``Gateway.close`` ends the episode and returns its record.

Status codes, chosen so that the OpenAI SDKs (which retry 429 and 5xx) never retry a call that
cannot succeed: malformed or unsupported input 400; a missing or unknown key 401; a key whose
episode ended 401 too (code "episode_ended": the key was a credential and no longer is, like a
revoked key; 404 would tell a client the route is wrong); a prompt past the context length 400
(code "context_length_exceeded", as OpenAI's); the episode's call budget spent 400 (code
"call_budget_exceeded": a 429 would be retried by the SDK, and the budget never comes back);
an unknown route 404; an engine failure 500.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import warnings
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rlhf.config import GatewayConfig
from rlhf.types import SamplingSettings
from rollouts.gateway.batcher import Batcher, Request
from rollouts.gateway.context import PreviousCall, Renderer
from rollouts.gateway.episode import Episode, EpisodeRecord
from rollouts.gateway.errors import ApiError, bad_request
from rollouts.gateway.messages import normalise, tools_key, tools_of
from rollouts.gateway.tool_calls import ReplyFormatter
from rollouts.gateway.wire import completion_body, models_body, sse_chunks
from rollouts.requests import max_prompt_len

log = logging.getLogger(__name__)

# A request's own sampling fields: the trainer's sampling is what the learner's log-probs assume.
CLIENT_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "logit_bias")
_MAX_BODY = 32 << 20
_ENDED_KEPT = 1 << 16


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver listens with a backlog of 5: when a step's episodes (agent.concurrency, 32 by
    # default) connect at once while the server's threads render others' prompts, the overflow's
    # connections fail and an agent without retries fails its episode (measured: 2 to 8 of 32).
    request_queue_size = 1024


class GatewayMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, float] = {}
        self._batch_rows: list[int] = []

    def add(self, name: str, value: float = 1.0) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0.0) + value

    def batch(self, rows: int) -> None:
        with self._lock:
            self._batch_rows.append(rows)

    def take(self) -> dict[str, float]:
        with self._lock:
            counts, rows = self._counts, self._batch_rows
            self._counts, self._batch_rows = {}, []
        out = {k: counts.get(k, 0.0) for k in
               ("gateway/requests", "gateway/client_sampling", "gateway/segments_new")}
        out["gateway/batches"] = float(len(rows))
        out["gateway/batch_size_mean"] = sum(rows) / len(rows) if rows else 0.0
        out.update({k: v for k, v in counts.items() if k.startswith("gateway/errors/")})
        return out


class Gateway:
    def __init__(self, engines, tokenizer, sampling: SamplingSettings, cfg: GatewayConfig, max_model_len: int,
                 host: str = "127.0.0.1") -> None:
        """Starts listening (a daemon thread) on ``cfg.host``, or ``host`` when that is None (the
        caller's choice: loopback by default). ``engines``: anything with
        ``.generate(prompt_ids, sampling, seed=) -> RolloutBatch`` (an EngineGroup)."""
        if cfg.client_sampling not in ("override", "refuse"):
            raise ValueError(f"gateway.client_sampling={cfg.client_sampling!r} is not 'override' or 'refuse'")
        if not cfg.batch_wait_s >= 0:
            raise ValueError(f"gateway.batch_wait_s={cfg.batch_wait_s} must be >= 0")
        if cfg.max_batch < 1:
            raise ValueError(f"gateway.max_batch={cfg.max_batch} must be >= 1")
        if not 0 <= cfg.port <= 65535:
            raise ValueError(f"gateway.port={cfg.port} is not a port (0: any free one)")
        if max_model_len < 2:
            raise ValueError(f"max_model_len={max_model_len} leaves no room for a prompt and a reply")
        self.cfg, self.sampling, self.max_model_len = cfg, sampling, max_model_len
        self.formatter = ReplyFormatter(cfg.tool_parser, tokenizer)
        self.renderer = Renderer(tokenizer)
        self._metrics = GatewayMetrics()
        self.batcher = Batcher(engines, sampling, cfg.batch_wait_s, cfg.max_batch, self._metrics.batch)
        self._listen(cfg, host)

    def _listen(self, cfg: GatewayConfig, host: str) -> None:
        """The episodes' bookkeeping, then the HTTP server in a daemon thread."""
        self._lock = threading.Lock()
        self._episodes: dict[str, Episode] = {}
        # Keys of ended episodes, for the "episode ended" error; the oldest are forgotten past
        # _ENDED_KEPT (their calls then get "unknown key", also a 401) so a long run's memory stays flat.
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._opened = 0
        bind = cfg.host if cfg.host is not None else host
        self._server = _Server((bind, cfg.port), _handler(self))
        self.host, self.port = bind, self._server.server_address[1]
        self.base_url = f"http://{bind}:{self.port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="gateway-http", daemon=True)
        self._thread.start()

    # -- episodes --------------------------------------------------------------------------------

    def open(self, seed: int | None = None, max_calls: int | None = None) -> str:
        """A new episode; returns its key (the application's API key)."""
        if max_calls is not None and max_calls < 1:
            raise ValueError(f"max_calls={max_calls} must be >= 1 (or None: no budget)")
        key = "sk-ep-" + secrets.token_urlsafe(24)
        with self._lock:
            self._episodes[key] = Episode(key, self._opened, seed, max_calls)
            self._opened += 1
        self.batcher.opened(key)
        return key

    def close(self, key: str) -> EpisodeRecord:
        """Ends the episode: later calls with its key get a 401 "episode ended"; its queued requests
        fail the same way, and one already in the engines is answered so but not recorded."""
        with self._lock:
            ep = self._episodes.pop(key, None)
            if ep is None:
                raise KeyError("close: no open episode has this key" + (" (it ended already)" if key in self._ended else ""))
            ep.ended = True
            self._ended[key] = None
            if len(self._ended) > _ENDED_KEPT:
                self._ended.popitem(last=False)
            record = ep.record()
        self.batcher.closed(key, ended_error())
        return record

    def count_error(self, kind: str) -> None:
        self._metrics.add(f"gateway/errors/{kind}")

    def metrics(self) -> dict[str, float]:
        """Counters since the last call, then reset."""
        return self._metrics.take()

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.batcher.stop()

    # -- requests (called from the HTTP threads) ---------------------------------------------------

    def _episode(self, authorization: str | None) -> Episode:
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise ApiError(401, "unknown_key", "no API key: send the episode's key as 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        with self._lock:
            ep = self._episodes.get(key)
            if ep is None:
                raise ended_error() if key in self._ended else ApiError(
                    401, "unknown_key", "the API key is not an open episode's key", code="invalid_api_key")
            return ep

    def handle(self, method: str, path: str, authorization: str | None, body: bytes | None) -> tuple[int, Any, bool]:
        """(status, JSON object or SSE bytes, is SSE) for one request; every error is counted."""
        if path == "/v1/chat/completions":
            self._metrics.add("gateway/requests")
        ep = None
        try:
            route = {("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/episodes/reward")}
            if (method, path) not in route:
                raise ApiError(404, "not_found", f"no route {method} {path}; this gateway serves GET /v1/models, "
                               "POST /v1/chat/completions and POST /v1/episodes/reward", code="not_found")
            ep = self._episode(authorization)
            if path == "/v1/models":
                return 200, models_body(self.cfg.model_name), False
            payload = _json(body)
            if path == "/v1/episodes/reward":
                return 200, self._post_reward(ep, payload), False
            return self._chat(ep, payload)
        except Exception as err:
            if not isinstance(err, ApiError):  # our bug: answered and counted, the server goes on
                log.exception("gateway: %s %s failed", method, path)
                err = ApiError(500, "internal", f"the gateway failed: {type(err).__name__}: {err}", type="server_error")
            self.count_error(err.kind)
            if ep is not None:
                with self._lock:
                    ep.count_error(err.kind)
            return err.status, err.body(), False

    def _post_reward(self, ep: Episode, payload: Any) -> dict:
        if not isinstance(payload, dict) or "reward" not in payload:
            raise bad_request('the body must be {"reward": <number or null>}', "reward")
        reward = payload["reward"]
        if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float))
                                   or not math.isfinite(reward)):
            raise bad_request(f"reward is {reward!r}; expected a finite number or null", "reward")
        with self._lock:
            if ep.ended:
                raise ended_error()
            ep.posted_reward, ep.reward_posted = None if reward is None else float(reward), True
        return {"object": "episode.reward", "reward": reward}

    def _chat(self, ep: Episode, body: Any) -> tuple[int, Any, bool]:
        request = self._validate(body)
        messages, tools = normalise(body["messages"]), tools_of(body)
        key_tools = tools_key(tools)
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        max_new_tokens = min(asked or self.sampling.max_new_tokens, self.sampling.max_new_tokens)
        stop = body.get("stop") or []
        stop = tuple([stop] if isinstance(stop, str) else stop) + tuple(self.sampling.stop)
        # One call of an episode at a time: each continues from the one before.
        with ep.call_lock:
            admit(ep)
            plan = self.renderer.plan(messages, tools, key_tools, ep.returned, ep.previous, ep.segment_ids())
            limit = max_prompt_len(self.max_model_len)
            if len(plan.context_ids) > limit:
                raise ApiError(400, "context_length", f"This model's maximum context length is {self.max_model_len} "
                               f"tokens. However, your messages resulted in {len(plan.context_ids)} tokens (at most "
                               f"{limit} leave room for a reply). Please reduce the length of the messages.",
                               param="messages", code="context_length_exceeded")
            # vLLM itself stops a row at max_model_len ("length"), so the room left needs no setting of its own.
            pending = Request(ep.key, ep.order, ep.seed, plan.context_ids, max_new_tokens, stop)
            self.batcher.submit(pending)
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            sampled = pending.result
            message, finish = self.formatter.message(sampled.text, sampled.finish_reason, request)
            (reply,) = normalise([message])
            with self._lock:
                if ep.ended:  # closed while its request was in the engines: not recorded
                    raise ended_error()
                new = ep.record_call(plan, sampled, PreviousCall(messages, key_tools, reply), sampled.text,
                                     [*body["messages"], message], message["content"] or "")
                ep.add_usage(len(plan.context_ids), len(sampled.completion_ids))
            if new:
                self._metrics.add("gateway/segments_new")
        out = completion_body(self.cfg.model_name, message, finish, len(plan.context_ids), len(sampled.completion_ids))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return 200, sse_chunks(out, include_usage), True
        return 200, out, False

    def _validate(self, body: Any):
        """vLLM's own ChatCompletionRequest checks the body's shape (the tool parser takes it too);
        then what the gateway does not serve is refused by name."""
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        if not isinstance(body, dict):
            raise bad_request(f"the body is a JSON {type(body).__name__}, not an object")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # max_tokens, which clients still send
                request = ChatCompletionRequest.model_validate(body)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise bad_request(f"invalid request: {where}: {first.get('msg')}", where or None) from None
        if body.get("n") not in (None, 1):
            raise bad_request(f"n={body.get('n')}: the gateway samples one reply per call (n=1); "
                              "call again for more", "n")
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise bad_request(f"{name}={value!r} must be an integer >= 1", name)
        if body.get("logprobs") or body.get("top_logprobs"):
            raise bad_request("logprobs are not returned by this gateway (it records them for training)", "logprobs")
        choice = body.get("tool_choice")
        if choice not in (None, "auto", "none"):
            raise bad_request(f"tool_choice={choice!r} is not served: the policy chooses freely ('auto' or 'none')",
                              "tool_choice")
        fmt = body.get("response_format")
        if fmt not in (None, {"type": "text"}):
            raise bad_request("response_format is not served: training samples the unconstrained policy",
                              "response_format")
        stop = body.get("stop")
        if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list)
                                                               and all(isinstance(s, str) for s in stop))):
            raise bad_request("stop must be a string or a list of strings", "stop")
        own = [f for f in CLIENT_SAMPLING if body.get(f) is not None]
        if own and self.cfg.client_sampling == "refuse":
            raise ApiError(400, "client_sampling", f"{own[0]} is the trainer's (rollout.*); this gateway refuses a "
                           "request's own sampling (gateway.client_sampling=refuse)", param=own[0],
                           code="client_sampling_refused")
        if own:
            self._metrics.add("gateway/client_sampling", len(own))
        return request


def admit(ep: Episode) -> None:
    """A call may go on (under the episode's call lock): its episode is open and has budget left."""
    if ep.ended:
        raise ended_error()
    if ep.max_calls is not None and ep.calls >= ep.max_calls:
        raise ApiError(400, "over_budget", f"this episode's budget of {ep.max_calls} model calls is spent",
                       code="call_budget_exceeded")


def ended_error() -> ApiError:
    return ApiError(401, "ended", "episode ended: this key's episode is over and takes no more calls",
                    code="episode_ended")


def _json(body: bytes | None) -> Any:
    try:
        return json.loads(body or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad_request(f"the body is not valid JSON: {err}") from None


def _handler(gateway: Gateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: every response carries its Content-Length
        server_version = "rlhf-gateway"

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def _serve(self, method: str) -> None:
            # The body is read before anything can fail, so the next request on the connection starts clean.
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY:
                self.close_connection = True
                err = ApiError(413, "bad_request", f"the body has {length} bytes, more than {_MAX_BODY}")
                gateway.count_error(err.kind)
                return self._send(err.status, err.body(), False)
            body = self.rfile.read(length) if length else None
            path = self.path.split("?", 1)[0]
            status, out, sse = gateway.handle(method, path, self.headers.get("Authorization"), body)
            self._send(status, out, sse)

        def _send(self, status: int, out: Any, sse: bool) -> None:
            data = out if sse else json.dumps(out).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/event-stream" if sse else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            # The request line only (no headers, so never a key), at debug level.
            log.debug("gateway %s: " + format, self.address_string(), *args)

    return Handler
