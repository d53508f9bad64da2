"""The rollout gateway (rollouts/gateway/) measured against the engines it serves.

(1) Batching: K concurrent episodes (threads with the openai client), each making C calls that
    extend the previous one, through a gateway that batches the open episodes' requests
    (gateway.max_batch default) vs one that sends each request alone (max_batch=1). Prints the wall
    time of each and the ratio (one-at-a-time / batched: > 1 means batching pays).
(2) Overhead per call: one call at a time, the openai client through the gateway (HTTP, rendering,
    tokenising, recording) vs a bare ``engines.generate`` of the same context ids, greedy so both
    sample the same tokens. Prints the median ms of each, the difference and the ratio.

Both run in alternating rounds (best round reported) so that other load on a shared machine hits
both sides alike; the CPU and the load average are printed.

    .venv/bin/python scripts/bench_gateway.py                                   # SmolLM2
    .venv/bin/python scripts/bench_gateway.py --model tiny-random-llama         # plumbing only
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or HF folder")
    p.add_argument("--episodes", type=int, default=8, help="K concurrent episodes in (1)")
    p.add_argument("--calls", type=int, default=3, help="C calls per episode in (1)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of (1)")
    p.add_argument("--overhead-calls", type=int, default=20, help="calls of each side in (2)")
    p.add_argument("--batch-wait-s", type=float, default=0.05, help="gateway.batch_wait_s of the batched side")
    p.add_argument("--kv-cache-gb", type=float, default=0.5)
    return p.parse_args()


def cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def episode(gateway, key: str, index: int, calls: int, errors: list) -> None:
    """An agent: each call sends the whole history back with one more user turn. Its episode is
    closed as soon as it is done (as the agent runner does), so the others stop waiting for it."""
    import openai

    try:
        client = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)
        messages = [{"role": "user", "content": f"Episode {index}: what is {index} + {index + 1}?"}]
        for _ in range(calls):
            reply = client.chat.completions.create(model="policy", messages=messages).choices[0].message
            messages += [reply.model_dump(exclude_none=True), {"role": "user", "content": "Check it once more."}]
    except Exception as err:  # reported by the caller: a failed episode makes the timing meaningless
        errors.append(err)
    finally:
        gateway.close(key)


def run_episodes(gateway, episodes: int, calls: int) -> float:
    keys = [gateway.open(seed=i) for i in range(episodes)]
    errors: list = []
    threads = [threading.Thread(target=episode, args=(gateway, k, i, calls, errors))
               for i, k in enumerate(keys)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} episodes failed; the first: {errors[0]!r}")
    return seconds


def main() -> None:
    args = parse_args()
    import openai
    from transformers import AutoTokenizer

    from rlhf.cluster.connect import init_ray
    from rlhf.config import GatewayConfig, RolloutConfig
    from rlhf.models import resolve_model_path
    from rlhf.types import SamplingSettings
    from rollouts.gateway import Gateway
    from rollouts.group import EngineGroup

    model_path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    init_ray()
    group = EngineGroup(RolloutConfig(num_engines=1, max_model_len=2048, kv_cache_gb=args.kv_cache_gb,
                                      timeout_s=600.0), model_path, "float32")
    sampling = SamplingSettings(n=1, temperature=1.0, max_new_tokens=args.max_new_tokens)
    batched = Gateway(group, tokenizer, sampling, GatewayConfig(batch_wait_s=args.batch_wait_s), 2048)
    alone = Gateway(group, tokenizer, sampling, GatewayConfig(max_batch=1), 2048)
    try:
        run_episodes(batched, 2, 1)  # warm-up: vLLM's first forwards on CPU pay one-off set-up
        times: dict[str, list[float]] = {"batched": [], "alone": []}
        for _ in range(args.rounds):
            times["batched"].append(run_episodes(batched, args.episodes, args.calls))
            times["alone"].append(run_episodes(alone, args.episodes, args.calls))
        batch_metrics = batched.metrics()
        b, a = min(times["batched"]), min(times["alone"])
        print(f"(1) {args.episodes} episodes x {args.calls} calls, {args.max_new_tokens} new tokens, "
              f"{args.model}: batched (batch_wait_s={args.batch_wait_s}) {b:.2f} s (mean batch {batch_metrics['gateway/batch_size_mean']:.1f} "
              f"requests), one at a time {a:.2f} s; one-at-a-time / batched = {a / b:.2f}x")

        greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=args.max_new_tokens)
        direct = Gateway(group, tokenizer, greedy, GatewayConfig(), 2048)
        messages = [{"role": "user", "content": "What is 2 + 3? Answer briefly."}]
        through, bare = [], []
        for _ in range(args.overhead_calls):
            key = direct.open()
            client = openai.OpenAI(base_url=direct.base_url, api_key=key, max_retries=0)
            start = time.perf_counter()
            client.chat.completions.create(model="policy", messages=messages)
            through.append(time.perf_counter() - start)
            seg = direct.close(key).segments[0]
            start = time.perf_counter()
            out = group.generate([seg.prompt_ids], greedy)
            bare.append(time.perf_counter() - start)
            if out.completions[0].completion_ids != seg.ids:
                raise RuntimeError("the bare engine call sampled other ids than the gateway's: not the same work")
        direct.shutdown()
        g, e = statistics.median(through) * 1e3, statistics.median(bare) * 1e3
        print(f"(2) per call ({len(seg.prompt_ids)} prompt tokens, {len(seg.ids)} new): through the gateway "
              f"{g:.1f} ms, bare engines.generate {e:.1f} ms; overhead {g - e:.1f} ms, ratio {g / e:.2f}x "
              f"(medians of {args.overhead_calls})")
        print(f"machine: {cpu_model()}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} (1 min)")
    finally:
        batched.shutdown()
        alone.shutdown()
        group.shutdown()


if __name__ == "__main__":
    main()
