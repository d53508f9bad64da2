"""The OpenAI-compatible gateway (rollouts/gateway/) with the real openai clients against real tiny
engines: the ids recorded per episode are exactly the ids the engine sampled, call by call; a call
that extends the previous one continues its segment (tool results masked out), a rewritten
history starts a new one; concurrent episodes are batched and never mix; every bad input gets its
OpenAI-shaped error and is counted. Rendering, continuation and tool-call parsing are also checked
without an engine, with the SmolLM2 tokenizer."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import socket
import threading
import time
import urllib.request

import openai
import pytest

from rlhf.config import GatewayConfig
from rlhf.types import SamplingSettings
from rollouts.engine import derive_seed
from rollouts.env.tools import with_tools
from rollouts.gateway import Gateway
from rollouts.gateway.context import PreviousCall, Renderer
from rollouts.gateway.errors import ApiError
from rollouts.gateway.messages import Message, normalise, tools_key
from rollouts.gateway.tool_calls import ReplyFormatter
from rollouts.group import EngineGroup
from tests.support.engines import one_engine

MAX_MODEL_LEN = 256
# Greedy, so a direct engine call on the same context gives the same ids.
GREEDY = SamplingSettings(n=1, temperature=0.0, max_new_tokens=4)
CALC = [{"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}]
USER = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_request(body: dict):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **body})


# --- tool-call parsing and rendering, no engine ---------------------------------------------------


def test_hermes_tool_call_text_becomes_openai_tool_calls(tokenizer):
    fmt = ReplyFormatter("hermes", tokenizer)
    text = 'Let me add. <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    message, finish = fmt.message(text, "stop", chat_request({"tools": CALC}))
    assert finish == "tool_calls" and message["content"] == "Let me add. "
    (call,) = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "add" and json.loads(call["function"]["arguments"]) == {"a": 2, "b": 3}
    # Two calls, nothing before them: content None, both calls in order.
    two = text.split(". ")[1] * 2
    message, finish = fmt.message(two, "stop", chat_request({"tools": CALC}))
    assert message["content"] is None and len(message["tool_calls"]) == 2 and finish == "tool_calls"


@pytest.mark.parametrize("body, text", [
    ({}, '<tool_call>{"name": "add", "arguments": {}}</tool_call>'),  # no tools offered: text as it is
    ({"tools": CALC, "tool_choice": "none"}, '<tool_call>{"name": "add", "arguments": {}}</tool_call>'),
    ({"tools": CALC}, "<tool_call>{not json</tool_call>"),  # a call that does not parse stays text
    ({"tools": CALC}, "The answer is 5."),
])
def test_text_without_a_parsable_offered_tool_call_stays_content(tokenizer, body, text):
    message, finish = ReplyFormatter("hermes", tokenizer).message(text, "length", chat_request(body))
    assert message == {"role": "assistant", "content": text} and finish == "length"


def test_unknown_tool_parser_is_named_with_the_choices(tokenizer):
    with pytest.raises(ValueError, match=r"gateway.tool_parser='nope' is not one of vLLM's tool parsers: \[.*'hermes'"):
        Gateway(None, tokenizer, GREEDY, GatewayConfig(tool_parser="nope"), MAX_MODEL_LEN)


@pytest.mark.parametrize("field, value, match", [
    ("client_sampling", "sometimes", "gateway.client_sampling='sometimes'"),
    ("max_batch", 0, "gateway.max_batch=0"),
    ("batch_wait_s", -1.0, "gateway.batch_wait_s=-1.0"),
    ("port", 70000, "gateway.port=70000"),
])
def test_bad_gateway_settings_are_named(tokenizer, field, value, match):
    with pytest.raises(ValueError, match=match):
        Gateway(None, tokenizer, GREEDY, GatewayConfig(**{field: value}), MAX_MODEL_LEN)


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}], "messages[0].tool_calls[0]"),
])
def test_bad_messages_are_400_naming_the_field(messages, param):
    with pytest.raises(ApiError) as err:
        normalise(messages)
    assert err.value.status == 400 and err.value.param == param


def test_messages_compare_equal_however_the_client_spells_them():
    # Content as parts or text, None or "", arguments with any spacing and key order, extra fields.
    a = normalise([{"role": "assistant", "content": None, "refusal": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"b": 3, "a": 2}'}}]}])
    b = normalise([{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}}]}])
    c = normalise([{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}])
    assert a == b and c == [Message("user", "Hi there")]


class TwoCalls:
    """A first call rendered and 'sampled' by hand (the text the model wrote, then EOS), so the
    continuation of a second call can be checked against the template without an engine."""

    def __init__(self, tokenizer, tools=CALC):
        self.r = Renderer(tokenizer)
        self.tools, self.key = tools, tools_key(tools)
        self.raw = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
        first = self.r.plan(normalise(USER), tools, self.key, {}, None, None)
        self.prompt = first.context_ids
        self.ids = encode(tokenizer, self.raw) + [tokenizer.eos_token_id]
        # The reply as the gateway returned it (content None, one tool call), as the client sends it back.
        self.reply = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_x", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]}
        (reply,) = normalise([self.reply])
        self.previous = PreviousCall(normalise(USER), self.key, reply)
        self.returned = {reply: self.raw}

    def plan(self, messages, tools=CALC):
        return self.r.plan(normalise(messages), tools, tools_key(tools), self.returned, self.previous,
                           (self.prompt, self.ids))


def test_first_call_prompt_is_the_template_with_tools_tokenised_as_prompt_data(tokenizer):
    calls = TwoCalls(tokenizer)
    # SmolLM2's template has no tool format: the tools are described in a system message.
    text = with_tools(tokenizer, USER, CALC)
    assert "<tools>" in text and text.endswith("<|im_start|>assistant\n")
    assert calls.prompt == encode(tokenizer, text)


def test_a_call_extending_the_last_continues_with_the_sampled_ids_and_appended_turn(tokenizer):
    calls = TwoCalls(tokenizer)
    tool = {"role": "tool", "tool_call_id": "call_x", "content": "5"}
    plan = calls.plan(USER + [calls.reply, tool])
    # The model sampled <|im_end|> (EOS) itself, so of the closing "<|im_end|>\n" only "\n" is added,
    # then the tool turn and the next assistant header, exactly as the template writes them.
    assert tokenizer.eos_token == "<|im_end|>"
    expected = encode(tokenizer, "\n") + encode(tokenizer, "<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n")
    assert not plan.new_segment and plan.appended == expected
    assert plan.context_ids == calls.prompt + calls.ids + expected
    # The same text as rendering the whole conversation, with the reply shown as the model wrote it.
    whole = with_tools(tokenizer, USER + [{"role": "assistant", "content": calls.raw}, tool], CALC)
    assert tokenizer.decode(plan.context_ids) == whole


def test_a_reply_cut_by_length_gets_the_whole_closing(tokenizer):
    calls = TwoCalls(tokenizer)
    calls.ids = calls.ids[:-1]  # no EOS: the budget ran out
    plan = calls.plan(USER + [calls.reply, {"role": "user", "content": "go on"}])
    assert plan.appended[:2] == encode(tokenizer, "<|im_end|>\n") and not plan.new_segment


@pytest.mark.parametrize("change", ["history rewritten", "reply edited", "tools changed", "earlier message edited"])
def test_a_call_that_does_not_extend_the_last_starts_a_new_segment(tokenizer, change):
    calls = TwoCalls(tokenizer)
    tool = {"role": "tool", "tool_call_id": "call_x", "content": "5"}
    messages, tools = USER + [calls.reply, tool], CALC
    if change == "history rewritten":
        messages = USER + [tool]
    elif change == "reply edited":
        messages = USER + [{**calls.reply, "content": "thinking"}, tool]
    elif change == "tools changed":
        tools = None
    else:
        messages = [{"role": "user", "content": "What is 2 + 4?"}, calls.reply, tool]
    plan = calls.plan(messages, tools)
    assert plan.new_segment and plan.appended == []
    assert plan.context_ids == encode(tokenizer, with_tools(tokenizer, messages_shown(calls, messages), tools))


def messages_shown(calls: TwoCalls, messages: list[dict]) -> list[dict]:
    """What the template is given: a reply this episode returned shows the text the model wrote."""
    return [{"role": "assistant", "content": calls.raw} if m is calls.reply else m for m in messages]


# --- against real engines --------------------------------------------------------------------------


class Recording:
    """The real engine group, with every generate call's request and result kept (copied)."""

    def __init__(self, group: EngineGroup) -> None:
        self.group, self.calls = group, []
        self._lock = threading.Lock()

    def generate(self, prompt_ids, sampling, seed=None):
        out = self.group.generate(prompt_ids, sampling, seed=seed)
        with self._lock:
            self.calls.append((copy.deepcopy(prompt_ids), sampling, seed, copy.deepcopy(out)))
        return out


class Broken:
    def generate(self, prompt_ids, sampling, seed=None):
        raise RuntimeError("engine 0 died during generate")


@pytest.fixture(scope="module")
def group(ray_session, tiny_model_path):
    with one_engine(tiny_model_path, MAX_MODEL_LEN) as g:
        yield g


@pytest.fixture
def served(group, tokenizer):
    """A gateway on the shared engines, recording their calls; shut down after the test."""
    gateways = []

    def start(engines=None, **cfg):
        engines = engines or Recording(group)
        gw = Gateway(engines, tokenizer, GREEDY, GatewayConfig(**cfg), MAX_MODEL_LEN)
        gateways.append(gw)
        return gw, engines

    yield start
    for gw in gateways:
        gw.shutdown()


def client(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)


def test_openai_client_chat_stream_and_models(served, tokenizer):
    gw, engines = served()
    key = gw.open(seed=0)
    c = client(gw, key)
    assert [m.id for m in c.models.list().data] == ["policy"]
    r = c.chat.completions.create(model="gpt-4o", messages=USER)
    (prompt,), sampling, _, out = engines.calls[0]
    sampled = out.completions[0]
    assert prompt == encode(tokenizer, tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True))
    assert sampling.n == 1 and sampling.max_new_tokens == 4 and sampling.temperature == 0.0
    assert r.choices[0].message.content == sampled.text and r.choices[0].finish_reason == sampled.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(sampled.completion_ids))
    assert r.model == "policy"
    # Streaming: the same kind of reply as chunks; with the same context (a fresh episode), greedy
    # gives the same text, and the usage chunk comes last.
    c2 = client(gw, gw.open(seed=0))
    chunks = list(c2.chat.completions.create(model="x", messages=USER, stream=True,
                                             stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == sampled.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == sampled.finish_reason
    assert chunks[-1].usage.completion_tokens == len(sampled.completion_ids)


def test_async_client(served):
    gw, engines = served()
    key = gw.open()

    async def call():
        async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0) as c:
            return await c.chat.completions.create(model="x", messages=USER, max_tokens=2, stop=["zz"])

    r = asyncio.run(call())
    # max_tokens=2 < the trainer's 4: the smaller wins; the request's stop joins the trainer's (none);
    # an episode opened without a seed is sampled unseeded.
    (_, sampling, seed, _), = engines.calls
    assert sampling.max_new_tokens == 2 and sampling.stop == ("zz",) and seed is None
    assert r.usage.completion_tokens <= 2
    assert r.choices[0].message.content == engines.calls[0][3].completions[0].text


def tool_loop(c: openai.OpenAI, rewrite: bool = False) -> None:
    """A calculator agent's two calls: the second sends the first reply back with a tool result
    after it (the tiny model writes no tool call, so the result follows its plain reply), or, with
    ``rewrite``, drops the reply (a history the agent rewrote)."""
    first = c.chat.completions.create(model="x", messages=USER, tools=CALC)
    reply = first.choices[0].message.model_dump(exclude_none=True)
    tool = {"role": "user", "content": "add(2, 3) = 5"}
    history = USER + ([] if rewrite else [reply]) + [tool]
    c.chat.completions.create(model="x", messages=history, tools=CALC)


def test_tool_loop_is_one_segment_of_exactly_the_sampled_ids_with_appended_ids_masked(served, group):
    gw, engines = served()
    key = gw.open(seed=7)
    tool_loop(client(gw, key))
    record = gw.close(key)
    (seg,) = record.segments
    (p1,), _, seed1, out1 = engines.calls[0]
    (p2,), _, seed2, out2 = engines.calls[1]
    s1, s2 = out1.completions[0].completion_ids, out2.completions[0].completion_ids
    # Layout: [call 1's sampled ids | appended (closing, user turn, header) | call 2's sampled ids].
    appended = p2[len(p1) + len(s1):]
    assert seg.prompt_ids == p1 and p2[: len(p1) + len(s1)] == p1 + s1
    assert seg.ids == s1 + appended + s2 and seg.mask == [1] * len(s1) + [0] * len(appended) + [1] * len(s2)
    assert seg.logprobs[len(s1): len(s1) + len(appended)] == [0.0] * len(appended)
    assert seg.logprobs[: len(s1)] == out1.completions[0].logprobs and seg.calls == [0, 1]
    # Batches of episode seed 7: derive_seed(7, 0), then derive_seed(7, 1).
    assert (seed1, seed2) == (derive_seed(7, 0), derive_seed(7, 1))
    # Greedy: the engine alone, given call 2's context, samples the same ids.
    assert group.generate([p2], GREEDY).completions[0].completion_ids == s2
    completion = record.to_completion(3)
    assert completion.prompt_index == 3 and completion.segments == [] and completion.token_mask == seg.mask
    assert completion.sampled_tokens == len(s1) + len(s2)
    assert gw.metrics()["gateway/segments_new"] == 0


def test_rewritten_history_gives_two_segments(served):
    gw, engines = served()
    key = gw.open()
    tool_loop(client(gw, key), rewrite=True)
    record = gw.close(key)
    first, second = record.segments
    (p1,), _, _, out1 = engines.calls[0]
    (p2,), _, _, out2 = engines.calls[1]
    assert (first.prompt_ids, first.ids, first.calls) == (p1, out1.completions[0].completion_ids, [0])
    assert (second.prompt_ids, second.ids, second.calls) == (p2, out2.completions[0].completion_ids, [1])
    completion = record.to_completion(0)
    assert completion.prompt_ids == p2 and completion.token_mask is None
    (earlier,) = completion.segments
    assert earlier.prompt_ids == p1 and earlier.completion_ids == first.ids and earlier.token_mask is None
    assert gw.metrics()["gateway/segments_new"] == 1
    assert record.transcript[-1]["role"] == "assistant" and record.final_text == out2.completions[0].text


def test_concurrent_episodes_are_batched_and_never_mix(served, tokenizer):
    # Every open episode waiting on the model sends the batch, so 4 episodes x 2 calls are 2 batches
    # of 4 (the long wait only ever applies if one of them never called).
    gw, engines = served(batch_wait_s=60.0)
    keys = [gw.open(seed=i) for i in range(4)]
    errors = []

    def agent(i: int) -> None:
        try:
            c = client(gw, keys[i])
            messages = [{"role": "user", "content": f"Episode {i}: count to three."}]
            r = c.chat.completions.create(model="x", messages=messages)
            c.chat.completions.create(model="x", messages=messages + [r.choices[0].message.model_dump(),
                                                                      {"role": "user", "content": "again"}])
        except Exception as e:  # surfaced below: an assert in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    m = gw.metrics()
    assert (m["gateway/requests"], m["gateway/batches"], m["gateway/batch_size_mean"]) == (8, 2, 4)
    # Rows in episode open order; each is seeded by its first row's episode (seed 0).
    assert [len(p) for p, *_ in engines.calls] == [4, 4] and engines.calls[0][2] == derive_seed(0, 0)
    for i, key in enumerate(keys):
        record = gw.close(key)
        (seg,) = record.segments
        assert f"Episode {i}:" in tokenizer.decode(seg.prompt_ids) and record.calls == 2
        p1, p2 = engines.calls[0][0][i], engines.calls[1][0][i]
        s1, s2 = (engines.calls[b][3].completions[i].completion_ids for b in range(2))
        assert seg.prompt_ids == p1 and seg.ids == p2[len(p1):] + s2 and seg.ids[: len(s1)] == s1


def test_max_batch_one_sends_every_request_alone(served):
    gw, engines = served(max_batch=1, batch_wait_s=60.0)
    keys = [gw.open() for _ in range(3)]
    threads = [threading.Thread(target=client(gw, k).chat.completions.create, kwargs=dict(model="x", messages=USER))
               for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [len(p) for p, *_ in engines.calls] == [1, 1, 1]


# --- bad input: status, OpenAI error shape, counted -----------------------------------------------


def raw(gw: Gateway, method: str, path: str, key: str | None, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(gw.base_url.removesuffix("/v1") + path, data=body, method=method)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def post(gw, key, body: dict, path="/v1/chat/completions"):
    return raw(gw, "POST", path, key, json.dumps(body).encode())


def test_bad_input_gets_its_openai_error_and_is_counted(served, caplog):
    caplog.set_level(logging.DEBUG)
    gw, engines = served(client_sampling="refuse")
    key = gw.open(max_calls=1)
    ok = {"model": "x", "messages": USER}
    cases = [  # (status, code or None, param, kind, response)
        (400, None, None, "bad_request", raw(gw, "POST", "/v1/chat/completions", key, b"{not json")),
        (400, None, "n", "bad_request", post(gw, key, {**ok, "n": 2})),
        (400, None, "messages[0].role", "bad_request", post(gw, key, {**ok, "messages": [{"role": "x", "content": ""}]})),
        (400, "client_sampling_refused", "temperature", "client_sampling", post(gw, key, {**ok, "temperature": 0.2})),
        (400, "context_length_exceeded", "messages", "context_length",
         post(gw, key, {**ok, "messages": [{"role": "user", "content": "word " * MAX_MODEL_LEN}]})),
        (401, "invalid_api_key", None, "unknown_key", post(gw, "sk-not-a-key", ok)),
        (401, "invalid_api_key", None, "unknown_key", post(gw, None, ok)),
        (404, "not_found", None, "not_found", post(gw, key, ok, path="/v1/completions")),
    ]
    assert post(gw, key, ok)[0] == 200  # the one call of the budget
    cases.append((400, "call_budget_exceeded", None, "over_budget", post(gw, key, ok)))
    gw.close(key)
    cases.append((401, "episode_ended", None, "ended", post(gw, key, ok)))
    cases.append((401, "episode_ended", None, "ended", post(gw, key, {"reward": 1.0}, "/v1/episodes/reward")))
    kinds = {}
    for status, code, param, kind, (got_status, body) in cases:
        assert got_status == status, body
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code
        assert body["error"]["param"] == param and key not in body["error"]["message"]
        kinds[kind] = kinds.get(kind, 0) + 1
    m = gw.metrics()
    assert {k: m[f"gateway/errors/{k}"] for k in kinds} == kinds
    assert len(engines.calls) == 1  # nothing bad reached the engines
    assert "gateway" in caplog.text and key not in caplog.text  # requests are logged (debug), keys never


def test_episode_ended_fails_with_the_openai_sdk_error(served):
    gw, _ = served()
    key = gw.open()
    gw.close(key)
    with pytest.raises(openai.AuthenticationError, match="episode ended"):
        client(gw, key).chat.completions.create(model="x", messages=USER)
    with pytest.raises(KeyError, match="ended already"):
        gw.close(key)


def test_client_sampling_override_counts_fields_and_uses_the_trainers(served):
    gw, engines = served()
    key = gw.open()
    client(gw, key).chat.completions.create(model="x", messages=USER, temperature=1.5, top_p=0.5, seed=3)
    assert gw.metrics()["gateway/client_sampling"] == 3 and engines.calls[0][1].temperature == 0.0
    assert gw.close(key).errors == {}


def test_reward_post_is_recorded_and_bad_rewards_refused(served):
    gw, _ = served()
    key = gw.open()
    for bad in ({"reward": "high"}, {"reward": True}, {"score": 1}):
        status, body = post(gw, key, bad, "/v1/episodes/reward")
        assert status == 400 and body["error"]["param"] == "reward"
    assert raw(gw, "POST", "/v1/episodes/reward", key, b"1e999")[0] == 400  # JSON, but not an object
    assert post(gw, key, {"reward": 0.5}, "/v1/episodes/reward") == (200, {"object": "episode.reward", "reward": 0.5})
    record = gw.close(key)
    assert (record.posted_reward, record.reward_posted, record.calls) == (0.5, True, 0)
    assert record.to_completion(0) is None and record.final_text == "" and record.errors == {"bad_request": 4}


def test_engine_failure_is_a_500_and_the_server_goes_on(served):
    gw, _ = served(engines=Broken())
    key = gw.open()
    with pytest.raises(openai.InternalServerError, match="engine 0 died"):
        client(gw, key).chat.completions.create(model="x", messages=USER)
    assert gw.metrics()["gateway/errors/engine"] == 1
    assert raw(gw, "GET", "/v1/models", key)[0] == 200


def test_listens_on_loopback_only_by_default(served):
    gw, _ = served()
    assert gw._server.server_address[0] == "127.0.0.1" and gw.base_url.startswith("http://127.0.0.1:")
    # This machine's own outward address (a UDP "connect" sends nothing) does not reach the port.
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))
        outward = probe.getsockname()[0]
    except OSError:
        outward = None
    finally:
        probe.close()
    if outward is None or outward.startswith("127."):
        pytest.skip("this machine has no non-loopback address to try")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((outward, gw.port), timeout=10).close()


def test_closing_an_episode_fails_its_waiting_request(served):
    # Two open episodes and a long wait: A's request waits for B's, which never comes; closing A
    # fails A's request with "episode ended" and sends nothing to the engines.
    gw, engines = served(batch_wait_s=600.0)
    a, _ = gw.open(), gw.open()
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=post(gw, a, {"model": "x", "messages": USER})))
    thread.start()
    deadline = time.monotonic() + 60
    while not gw.batcher._pending and time.monotonic() < deadline:
        time.sleep(0.01)
    record = gw.close(a)
    thread.join()
    status, body = result["r"]
    assert status == 401 and body["error"]["code"] == "episode_ended"
    assert engines.calls == [] and record.calls == 0 and record.segments == []
