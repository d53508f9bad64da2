"""Checking a generation request and turning it into vLLM's terms.

Pure functions, no engine: the group checks a request here before it reaches any engine, so bad
input fails fast with an error naming the prompt, and the engine reuses the same checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf.config import RolloutConfig
from rlhf.types import SamplingSettings

if TYPE_CHECKING:
    from vllm import SamplingParams


def max_prompt_len(max_model_len: int) -> int:
    """Longest prompt an engine accepts: it must leave room for at least one new token."""
    return max_model_len - 1


def validate_request(prompt_ids: list[list[int]], sampling: SamplingSettings, max_model_len: int) -> None:
    """Raise ValueError naming the first bad input; cheap, so it runs before any generation."""
    if sampling.n < 1:
        raise ValueError(f"sampling.n={sampling.n}: need at least 1 sample per prompt")
    if sampling.max_new_tokens <= 0:
        raise ValueError(f"sampling.max_new_tokens={sampling.max_new_tokens}: must be >= 1")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: nothing to generate")
    limit = max_prompt_len(max_model_len)
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty (0 tokens)")
        if len(ids) > limit:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens, more than {limit} "
                f"(rollout.max_model_len={max_model_len} minus 1 for the first new token)"
            )
        for j, tok in enumerate(ids):
            if not isinstance(tok, int) or isinstance(tok, bool) or tok < 0:
                raise ValueError(f"prompt {i} token {j} is {tok!r}, not a token id (int >= 0)")


def sampling_from_config(cfg: RolloutConfig) -> SamplingSettings:
    """Training-rollout sampling settings from the rollout config group."""
    return SamplingSettings(
        n=cfg.n,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_new_tokens=cfg.max_new_tokens,
        stop=tuple(cfg.stop),
    )


def to_sampling_params(sampling: SamplingSettings) -> "SamplingParams":
    """vLLM SamplingParams for ``sampling``.

    logprobs=0 returns the log-prob of each sampled token only. No per-request seed: it crashes
    the CPU sampler (``gen.get_offset``), so engines are seeded as a whole instead.
    """
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=sampling.max_new_tokens,
        stop=list(sampling.stop),
        stop_token_ids=list(sampling.stop_token_ids),
        logprobs=0,
        structured_outputs=None if sampling.json_schema is None else StructuredOutputsParams(json=sampling.json_schema),
    )


def probe_params() -> "SamplingParams":
    """Score a sequence instead of sampling from it: prompt log-probs of the given tokens only."""
    from vllm import SamplingParams

    # Never from the prefix cache: vLLM's own note is that prompt log-probs may then cover fewer
    # tokens than the prompt (its default for prompt log-probs in 0.32; pinned here).
    return SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, skip_reading_prefix_cache=True)
