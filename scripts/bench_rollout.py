"""Rollout throughput: our Ray-actor engine group vs a bare vllm.LLM vs transformers generate.

The same chat-templated arithmetic prompts go through (a) EngineGroup (vLLM inside a Ray actor),
(b) a bare ``vllm.LLM`` in this process and (c) transformers ``generate``; each prints output
tokens/s over its generation call alone (engine start is reported separately), then the ratios
(a)/(b) (goal: >= 0.9) and (b)/(c) (goal on CPU: >= 2). (a) and (b) run side by side in
alternating rounds (best round reported) so that other load on a shared machine hits both alike.
A tiny warm-up call precedes the timed ones: vLLM's first forward on CPU pays one-off set-up.
This process, and so (b) and (c), runs at Ray's worker niceness (15) like the actor path.

    .venv/bin/python scripts/bench_rollout.py                      # SmolLM2, 32 prompts x 8 x 64
    .venv/bin/python scripts/bench_rollout.py --prompts 8 --n 4 --max-new-tokens 32 --skip-hf
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or HF folder")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--num-engines", type=int, default=1, help="engines in the actor group (a)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for (c)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds of (a) and (b)")
    p.add_argument("--keep-niceness", action="store_true", help="don't run (b) at Ray's worker niceness")
    p.add_argument("--skip-hf", action="store_true", help="skip (c), the slowest part")
    return p.parse_args()


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    rng = random.Random(0)
    prompts = []
    for _ in range(count):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        messages = [{"role": "user", "content": f"What is {a} + {b}?"}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids))
    return prompts


class GroupPath:
    """(a) Our path: EngineGroup, vLLM inside a Ray actor."""

    def __init__(self, cfg, model_path: str, dtype: str) -> None:
        from rlhf.cluster.connect import init_ray
        from rollouts.group import EngineGroup

        init_ray()
        start = time.perf_counter()
        self.group = EngineGroup(cfg, model_path, dtype)
        self.start_s = time.perf_counter() - start

    def generate(self, prompts, sampling) -> tuple[int, float]:
        batch = self.group.generate(prompts, sampling)
        return batch.num_output_tokens, batch.generate_s

    def close(self) -> None:
        import ray

        self.group.shutdown()
        ray.shutdown()


class BareVllmPath:
    """(b) The same engine settings as the group, in this process, without Ray."""

    def __init__(self, cfg, model_path: str, dtype: str) -> None:
        from vllm import LLM

        from rollouts.engine import llm_kwargs

        start = time.perf_counter()
        self.llm = LLM(**llm_kwargs(cfg, model_path, dtype))
        self.start_s = time.perf_counter() - start

    def generate(self, prompts, sampling) -> tuple[int, float]:
        from rollouts.requests import to_sampling_params

        requests = [{"prompt_token_ids": ids} for ids in prompts]
        t0 = time.perf_counter()
        outputs = self.llm.generate(requests, to_sampling_params(sampling), use_tqdm=False)
        seconds = time.perf_counter() - t0
        return sum(len(s.token_ids) for out in outputs for s in out.outputs), seconds

    def close(self) -> None:
        from rollouts.engine import shutdown_llm

        shutdown_llm(self.llm)
        del self.llm
        gc.collect()


def bench_transformers(model_path: str, dtype: str, prompts, sampling, threads: int) -> tuple[float, int, float]:
    """(c) One batched sampling call: all prompts, n return sequences each, left-padded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    started = time.perf_counter() - start
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(
        do_sample=True,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=None if sampling.top_k < 0 else sampling.top_k,
        pad_token_id=pad,
    )
    with torch.no_grad():
        model.generate(input_ids=input_ids[:1], attention_mask=attention[:1], max_new_tokens=2, **kwargs)
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.n,
            **kwargs,
        )
        seconds = time.perf_counter() - t0
    # Count each sequence up to and including its EOS, as vLLM does (the rest is padding).
    tokens = 0
    for row in out[:, width:].tolist():
        tokens += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
    return started, tokens, seconds


def match_ray_worker_niceness() -> int:
    """Run this process (and the engine (b) starts from it) at Ray's worker niceness.

    Ray starts its workers, and so the engine actor's vLLM processes, at niceness 15
    (RAY_worker_niceness). On a machine shared with other jobs a niceness-0 bare engine would win
    CPU time from the actor path for reasons that have nothing to do with the actor overhead.
    """
    import ray

    target = ray.get(ray.remote(lambda: os.nice(0)).remote())
    return os.nice(max(0, target - os.nice(0)))


def _best(runs: list[tuple[int, float]]) -> tuple[int, float]:
    """The (tokens, seconds) round with the highest tokens/s: other load only ever slows a round."""
    return max(runs, key=lambda r: r[0] / r[1])


def _warmup(sampling):
    from dataclasses import replace

    return replace(sampling, n=1, max_new_tokens=2)


def main() -> None:
    args = parse_args()
    from rlhf.config import RolloutConfig
    from rollouts.engine import engine_env_vars

    cfg = RolloutConfig(
        num_engines=args.num_engines,
        max_model_len=1024,
        kv_cache_gb=args.kv_cache_gb,
        num_cpus_per_engine=0.5,
    )
    # (b) runs in this process: give it the CPU settings the actors get, before vLLM is imported.
    os.environ.update(engine_env_vars(cfg))

    from transformers import AutoTokenizer

    from rlhf.models import resolve_model_path
    from rlhf.types import SamplingSettings

    model_path = resolve_model_path(args.model)
    prompts = make_prompts(AutoTokenizer.from_pretrained(model_path), args.prompts)
    sampling = SamplingSettings(n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    print(f"model={args.model} dtype={args.dtype} prompts={len(prompts)} n={args.n} "
          f"max_new_tokens={args.max_new_tokens} cpus={os.cpu_count()}")

    # (a) and (b) stay up together and take turns, round by round, so that load from other
    # processes on a shared machine falls on both alike; each path's best round is reported.
    paths = {}
    try:
        paths["(a) EngineGroup (Ray actor)"] = GroupPath(cfg, model_path, args.dtype)
        if not args.keep_niceness:
            print(f"niceness of this process and (b): {match_ray_worker_niceness()}")
        paths["(b) bare vllm.LLM"] = BareVllmPath(cfg, model_path, args.dtype)
        rounds: dict[str, list[tuple[int, float]]] = {name: [] for name in paths}
        for path in paths.values():
            path.generate(prompts[:1], _warmup(sampling))
        for _ in range(args.rounds):
            for name, path in paths.items():
                rounds[name].append(path.generate(prompts, sampling))
    finally:
        for path in paths.values():
            path.close()
    results = {name: (paths[name].start_s, *_best(r)) for name, r in rounds.items()}
    if not args.skip_hf:
        results["(c) transformers generate"] = bench_transformers(
            model_path, args.dtype, prompts, sampling, args.threads
        )
    for name, r in rounds.items():
        print(f"{name} per round tok/s: " + ", ".join(f"{t / s:.1f}" for t, s in r))

    rates = {}
    print(f"{'path':32s} {'start s':>8s} {'tokens':>8s} {'gen s':>8s} {'tok/s':>8s}")
    for name, (started, tokens, seconds) in results.items():
        rates[name[:3]] = tokens / seconds
        print(f"{name:32s} {started:8.1f} {tokens:8d} {seconds:8.1f} {tokens / seconds:8.1f}")
    print(f"ratio (a)/(b): {rates['(a)'] / rates['(b)']:.2f}  (goal >= 0.90)")
    if "(c)" in rates:
        print(f"ratio (b)/(c): {rates['(b)'] / rates['(c)']:.2f}  (goal >= 2 on CPU)")
        print(f"ratio (a)/(c): {rates['(a)'] / rates['(c)']:.2f}")


if __name__ == "__main__":
    main()
