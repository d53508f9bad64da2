"""Learner benchmark: GRPO step throughput vs a bare torch loop, and weight-sync seconds.

    .venv/bin/python scripts/bench_learner.py                 # SmolLM2-135M, ZeRO-2, 1 rank, vLLM engine
    .venv/bin/python scripts/bench_learner.py --no-engine     # learner side of the sync only
    .venv/bin/python scripts/bench_learner.py --model tiny-random-llama --stage 3 --ranks 2

1. Throughput (goal: learner overhead <= 10%). The same random batch (``--rows`` sequences of
   ``--prompt`` + ``--response`` tokens, right-padded lengths) is trained on by
   - the learner: ``LearnerGroup.train_step`` (Ray actor rank(s), DeepSpeed ZeRO, GRPO objective
     with entropy metrics, micro-batches of ``--micro``), timed from the driver, and
   - a bare loop in this process: forward, log-softmax gather, policy-gradient loss, backward over
     the same micro-batches, gradient clipping, torch AdamW step, with the same thread count.
   - with ``--group-size n`` > 1 (rows share prompts n at a time), also the learner with
     ``learner.share_prompt`` on (the default; the first learner runs with it off, the bare
     loop's arithmetic), which computes each shared prompt once.
   Tokens/s counts attention tokens; they alternate step by step (``--warmup`` untimed, then
   ``--steps`` timed) so both see the same background load, and min and median are reported.
2. Weight sync (goal: <= 1 s on CPU for SmolLM2-135M): ``LearnerGroup.sync_weights`` into a real
   vLLM engine (gather + write to /dev/shm, engine reload, probe), ``--syncs`` times.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import os
import statistics
import time

import psutil
import torch


def _runs(cfg) -> str:
    """What the learner runs where it differs from --stage (one fp32 rank runs without ZeRO)."""
    from rlhf.learner.ds_config import zero_stage

    return "" if zero_stage(cfg, "float32") == cfg.zero_stage else ", run without ZeRO"


def make_batch(rows: int, prompt: int, response: int, vocab: int, group: int = 1, seed: int = 0):
    """Rows of ``prompt`` tokens (the same prompt for each ``group`` consecutive rows, as GRPO's
    samples of one prompt) and ``response // 2 .. response`` completion tokens."""
    from rlhf.types import TrainBatch

    g = torch.Generator().manual_seed(seed)
    L = prompt + response
    ids = torch.randint(0, vocab, (rows, L), generator=g)
    ids[:, :prompt] = ids[::group, :prompt].repeat_interleave(group, dim=0)[:rows]
    lengths = prompt + torch.randint(response // 2, response + 1, (rows,), generator=g)
    pos = torch.arange(L)[None, :]
    attention = (pos < lengths[:, None]).long()
    response_mask = ((pos >= prompt) & (attention > 0)).float()
    return TrainBatch(input_ids=ids, attention_mask=attention, response_mask=response_mask,
                      advantages=torch.randn(rows, generator=g))


class BareLoop:
    """The baseline: a plain torch policy-gradient step in this process."""

    def __init__(self, model_path: str, threads: int, lr: float) -> None:
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True)
        self.model.config.use_cache = False
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr)

    def step(self, batch, micro: int) -> None:
        tokens = batch.response_mask.sum()
        self.opt.zero_grad()
        for i in range(0, batch.size, micro):
            mb = batch.select(slice(i, i + micro))
            # The same work as the learner: logits only from the position predicting the first
            # completion token (TrainBatch.loss_start).
            start = mb.loss_start()
            ids = mb.input_ids
            logits = self.model(input_ids=ids, attention_mask=mb.attention_mask,
                                logits_to_keep=ids.shape[1] - start).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, start + 1 :, None])[..., 0]
            mask = mb.response_mask[:, start + 1 :]
            loss = -(mb.advantages[:, None] * logp * mask).sum() / tokens
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per rank and for the bare loop")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=1, help="rows sharing one prompt (GRPO's n)")
    parser.add_argument("--max-tokens", type=int, default=0, help="learner.max_tokens_per_micro_batch")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--syncs", type=int, default=3)
    parser.add_argument("--no-engine", action="store_true", help="time only the learner side of the sync")
    parser.add_argument("--sync-only", action="store_true", help="skip the throughput comparison")
    args = parser.parse_args()

    import ray

    from rlhf.cluster.connect import init_ray
    from rlhf.config import AlgoConfig, LearnerConfig, RolloutConfig
    from rlhf.learner import LearnerGroup
    from rlhf.models import resolve_model_path

    path = resolve_model_path(args.model)
    batch = make_batch(args.rows, args.prompt, args.response, vocab=49152, group=args.group_size)
    tokens = float(batch.attention_mask.sum())
    print(f"model {args.model}: {args.rows} rows x {args.prompt}+{args.response} tokens ({tokens:.0f} attention "
          f"tokens), prompts shared by {args.group_size} rows, micro-batch {args.micro}, {args.threads} threads",
          flush=True)

    init_ray(num_cpus=4)
    cfg = LearnerConfig(num_ranks=args.ranks, zero_stage=args.stage, micro_batch_size=args.micro,
                        num_threads=args.threads, lr=1e-6, timeout_s=1800.0,
                        max_tokens_per_micro_batch=args.max_tokens, share_prompt=False)
    learner = LearnerGroup(cfg, AlgoConfig(), path, "float32", False, total_updates=100)
    sharing = None
    if args.group_size > 1 and not args.sync_only:
        sharing = LearnerGroup(replace(cfg, share_prompt=True), AlgoConfig(), path, "float32", False, total_updates=100)
    bare_loop = None if args.sync_only else BareLoop(path, args.threads, lr=1e-6)
    # CPU seconds of the rank processes as well as wall time: on a shared 2-core box other jobs
    # stretch wall time by several x, CPU time much less.
    def procs(group) -> list:
        return [psutil.Process(ray.get(a.__ray_call__.remote(lambda self: os.getpid()))) for a in group.ranks]

    rank_procs = procs(learner)
    share_procs = procs(sharing) if sharing else []
    me = psutil.Process()

    def cpu(procs) -> float:
        return sum(p.cpu_times().user + p.cpu_times().system for p in procs)

    try:
        # Alternate the two so that both see the same background load; report min and median.
        bare, wall, bare_cpu, learner_cpu, shared, shared_cpu = [], [], [], [], [], []
        for step in range(0 if args.sync_only else args.warmup + args.steps):
            start, c0 = time.perf_counter(), cpu([me])
            bare_loop.step(batch, args.micro)
            b, bc = time.perf_counter() - start, cpu([me]) - c0
            start, c0 = time.perf_counter(), cpu(rank_procs)
            metrics = learner.train_step(batch)
            w, wc = time.perf_counter() - start, cpu(rank_procs) - c0
            line = f"  step {step}: bare {b:.2f} s ({bc:.2f} CPU s), learner {w:.2f} s ({wc:.2f} CPU s)"
            if sharing:
                start, c0 = time.perf_counter(), cpu(share_procs)
                sharing.train_step(batch)
                sw, swc = time.perf_counter() - start, cpu(share_procs) - c0
                line += f", learner sharing prompts {sw:.2f} s ({swc:.2f} CPU s)"
            print(line, flush=True)
            if step >= args.warmup:
                bare.append(b)
                wall.append(w)
                bare_cpu.append(bc)
                learner_cpu.append(wc)
                if sharing:
                    shared.append(sw)
                    shared_cpu.append(swc)
        rows = [("bare torch loop", bare, bare_cpu),
                (f"learner (ZeRO-{args.stage}{_runs(cfg)}, {args.ranks} rank(s), share_prompt off)", wall, learner_cpu)]
        if sharing:
            rows.append(("learner, share_prompt on", shared, shared_cpu))
        for name, times, cpus in [] if args.sync_only else rows:
            print(f"{name}: min {min(times):.2f} s/step ({tokens / min(times):.1f} tokens/s), median "
                  f"{statistics.median(times):.2f} s/step ({tokens / statistics.median(times):.1f} tokens/s), "
                  f"median {statistics.median(cpus):.2f} CPU s/step")
        if not args.sync_only:
            print(f"learner overhead vs bare loop: wall {100 * (min(wall) / min(bare) - 1):+.1f}% by min, "
                  f"{100 * (statistics.median(wall) / statistics.median(bare) - 1):+.1f}% by median; CPU time "
                  f"{100 * (statistics.median(learner_cpu) / statistics.median(bare_cpu) - 1):+.1f}% by median "
                  f"(goal <= +10%); last loss {metrics['loss']:.4f}")
        if sharing:
            print(f"prompt sharing: {statistics.median(wall) / statistics.median(shared):.2f}x the learner's "
                  f"tokens/s by median ({min(wall) / min(shared):.2f}x by min), "
                  f"{statistics.median(bare) / statistics.median(shared):.2f}x the bare loop's")
            sharing.shutdown()
        del bare_loop

        if args.no_engine:
            out = []
            for _ in range(args.syncs):
                import shutil
                import uuid

                d = f"{cfg.sync_dir}/rlhf-bench-{uuid.uuid4().hex[:8]}"
                try:
                    paths, nbytes, secs = learner._call("weight gather", "write_weights", None, d, True)[0]
                finally:
                    shutil.rmtree(d, ignore_errors=True)
                out.append(secs)
            print(f"weight sync, learner side (gather + write {nbytes / 1e6:.0f} MB to {cfg.sync_dir}): "
                  + ", ".join(f"{s:.2f}" for s in out) + " s")
        else:
            from rollouts.group import EngineGroup
            from transformers import AutoTokenizer

            probe = AutoTokenizer.from_pretrained(path)("What is 12 + 7? Think step by step.")["input_ids"]
            engines = EngineGroup(RolloutConfig(num_engines=1, max_model_len=512, kv_cache_gb=0.25), path, "float32")
            try:
                reports = [learner.sync_weights(engines, probe, tolerance=1e-3) for _ in range(args.syncs)]
            finally:
                engines.shutdown()
            for r in reports:
                print(f"weight sync: {r.seconds:.2f} s total (gather+write {r.gather_s:.2f} s, engine load "
                      f"{r.load_s:.2f} s, probe {r.seconds - r.gather_s - r.load_s:.2f} s), "
                      f"{r.num_bytes / 1e6:.0f} MB, {r.gb_per_s:.2f} GB/s, probe gap {r.probe_gap:.2e}")
            print(f"weight sync median: {statistics.median(r.seconds for r in reports):.2f} s (goal <= 1 s)")
    finally:
        learner.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
