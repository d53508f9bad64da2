"""The learner on one CUDA GPU: NCCL process group, DeepSpeed ZeRO-2/3, fp32 and bf16.

Run by scripts/gpu_check.sh as ``torchrun --nproc_per_node 1 scripts/gpu_learner_check.py ...``.
The GPU machine has no Ray, so ``LearnerRank`` (the class each Ray actor hosts) is driven
directly; the checks reuse tests/test_learner.py's batches and plain-torch reference.

    --check STAGE   correctness at ZeRO stage STAGE on CUDA:
                    fp32: two GRPO updates vs the plain torch loop (params, grad norm, loss, lr);
                    log-probs vs a transformers forward; a NaN advantage skips the update;
                    save -> step -> load restores the parameters; HF export loads in transformers;
                    bf16: updates stay finite and log-probs match transformers at bf16 resolution.
    --bench         tokens/s of a GRPO step vs a bare torch loop, and weight gather+write seconds,
                    for a ~0.46B random Llama in bf16 built on the spot (no download).
Prints one line per check: PASS/FAIL name: figures. Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

FAILED: list[str] = []
# --dry-run-cpu runs the same script on CPU with gloo, to check the script itself before it
# spends GPU time; the GPU run uses CUDA and NCCL.
DEVICE, BACKEND = "cuda", "nccl"


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def make_rank(cfg, algo, model_path: str, dtype: str, total_updates: int):
    from rlhf.learner.rank import LearnerRank

    if int(os.environ["WORLD_SIZE"]) != 1:
        raise SystemExit("gpu_learner_check runs one process (torchrun --nproc_per_node 1)")
    rank = LearnerRank(0, 1, cfg, algo, model_path, dtype, False, total_updates)
    # The single rank chooses its own point, as rank 0 of a Ray group does: torchrun's agent store
    # already holds MASTER_PORT, and our store binds its port itself. Later checks' ranks find the
    # first one's process group standing and keep it (DeepSpeed holds on to it).
    rank.start(rank.rendezvous_point())
    return rank


def step(rank, batch) -> dict:
    from rlhf.algo import normalisers
    from rlhf.learner import reduce_metrics

    start = time.perf_counter()
    tokens, seqs = normalisers(batch.response_mask, batch.sample_weight)
    out = rank.train_step(batch, tokens, seqs)
    return reduce_metrics([out], time.perf_counter() - start)


def hf_logprobs(model_path: str, state: dict, batch, dtype: torch.dtype) -> torch.Tensor:
    from rlhf.learner.rank import load_hf_model

    model = load_hf_model(model_path, "float32", False)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model = model.to(DEVICE, dtype).eval()
    ids = batch.input_ids.to(DEVICE)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=batch.attention_mask.to(DEVICE)).logits
    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros(batch.size, 1, dtype=lp.dtype, device=lp.device), lp], dim=1).cpu()


def check_fp32(stage: int, model_path: str) -> None:
    import test_learner as T
    from transformers import AutoModelForCausalLM

    from rlhf.learner.checkpoint import save_checkpoint

    cfg = T.learner_cfg(stage, num_ranks=1, backend=BACKEND, num_gpus_per_rank=1.0)
    rank = make_rank(cfg, T.ALGO, model_path, "float32", T.TOTAL_STEPS)
    name = f"zero{stage}/fp32"
    initial = rank.full_state()
    batches, metrics = [], []
    for s in range(2):
        batch = T.make_batch(seed=s)
        batch.ref_logprobs = rank.compute_ref_logprobs(batch)
        batch = T.off_policy(batch, rank.compute_logprobs(batch), seed=100 + s)
        batches.append(batch)
        metrics.append(step(rank, batch))
    after = rank.full_state()
    ref = T.plain_torch_updates(model_path, cfg, batches, device=DEVICE)
    diff = max((after[k] - v).abs().max().item() for k, v in ref["params"].items())
    moved = min((v - initial[k]).abs().max().item() for k, v in ref["params"].items())
    norm_rel = max(abs(m["grad_norm"] / r - 1) for m, r in zip(metrics, ref["grad_norm"]))
    lr_ok = all(m["lr"] == r for m, r in zip(metrics, ref["lr"]))
    # CUDA sums in other orders than the CPU (atomics in embedding backward): allow 10x the CPU
    # tolerances of tests/test_learner.py.
    report(f"{name} two updates = plain torch", diff < 10 * T.PARAM_ATOL and norm_rel < 10 * T.NORM_RTOL and lr_ok
           and moved > 1e-4, f"max |param diff| {diff:.2e}, grad-norm rel diff {norm_rel:.2e}, lr equal {lr_ok}, "
           f"min param move {moved:.2e}, loss {metrics[-1]['loss']:.6f} vs {ref['loss'][-1]:.6f}")

    batch = T.make_batch(seed=7)
    got = rank.compute_logprobs(batch).double()
    want = hf_logprobs(model_path, rank.full_state(), batch, torch.float32)
    valid = batch.response_mask.bool()  # only completion tokens carry a log-prob
    gap = (got[valid] - want[valid]).abs().max().item()
    report(f"{name} log-probs = transformers", gap < 1e-4, f"max gap {gap:.2e}")

    before = rank.full_state()
    bad = T.make_batch(seed=11)
    bad.ref_logprobs = rank.compute_ref_logprobs(bad)
    bad.advantages[6] = float("nan")
    m = step(rank, bad)
    same = all(torch.equal(before[k], v) for k, v in rank.full_state().items())
    report(f"{name} NaN loss skips the update", m["skipped"] == 1.0 and same, f"skipped={m['skipped']}, params unchanged {same}")

    tmp = Path(tempfile.mkdtemp(prefix="rlhf-gpu-"))
    try:
        ckpt = save_checkpoint(tmp / "checkpoints", 3, lambda d: [rank.save_checkpoint(str(d))], {"step": 3}, keep_last=1)
        saved = rank.full_state()
        good = T.make_batch(seed=12)
        good.ref_logprobs = rank.compute_ref_logprobs(good)
        step(rank, good)
        rank.load_checkpoint(str(ckpt))
        restored = all(torch.equal(saved[k], v) for k, v in rank.full_state().items())
        report(f"{name} save -> step -> load restores parameters", restored, f"{ckpt}")

        out = tmp / "export"
        out.mkdir()
        rank.export_hf(str(out))
        shutil.copy(Path(model_path) / "config.json", out)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        ok = all(torch.equal(p.detach(), saved[n]) for n, p in model.named_parameters())
        report(f"{name} HF export loads in transformers", ok, f"{sorted(p.name for p in out.iterdir())}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_bf16(stage: int, model_path: str) -> None:
    import math

    import test_learner as T

    cfg = T.learner_cfg(stage, num_ranks=1, backend=BACKEND, num_gpus_per_rank=1.0)
    rank = make_rank(cfg, T.ALGO, model_path, "bfloat16", T.TOTAL_STEPS)
    name = f"zero{stage}/bf16"
    ms = []
    for s in range(3):
        batch = T.make_batch(seed=s)
        batch.ref_logprobs = rank.compute_ref_logprobs(batch)
        ms.append(step(rank, batch))
    finite = all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["skipped"] == 0 for m in ms)
    report(f"{name} updates are finite and applied", finite,
           "grad norms " + ", ".join(f"{m['grad_norm']:.3f}" for m in ms) + f"; tokens/s {ms[-1]['tokens/s']:.0f}")
    batch = T.make_batch(seed=7)
    got = rank.compute_logprobs(batch).double()
    want = hf_logprobs(model_path, rank.full_state(), batch, torch.bfloat16)
    valid = batch.response_mask.bool()  # only completion tokens carry a log-prob
    gap = (got[valid] - want[valid]).abs().max().item()
    # Both sides run the same bf16 weights; the gap is kernel/rounding noise at bf16 resolution.
    report(f"{name} log-probs = transformers (bf16)", gap < 0.05, f"max gap {gap:.2e}")


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build_bench_model(tokenizer_dir: str, layers: int, hidden: int) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(tempfile.mkdtemp(prefix="rlhf-bench-model-"))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=2,
                         head_dim=128, tie_word_embeddings=True,
                         max_position_embeddings=2048, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


def bench(model_path: str, stage: int, layers: int, hidden: int, rows: int) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_learner import make_batch

    from rlhf.config import AlgoConfig, LearnerConfig

    path = build_bench_model(model_path, layers, hidden)
    batch = make_batch(rows=rows, prompt=128, response=384, vocab=49152)
    tokens = float(batch.attention_mask.sum())
    micro = 8

    # Bare loop: bf16 weights, fused torch AdamW, the same micro-batches.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(DEVICE).train()
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=DEVICE == "cuda" or None)
    ntok = batch.response_mask.sum().to(DEVICE)
    times = []
    for s in range(5):
        sync()
        start = time.perf_counter()
        opt.zero_grad()
        for i in range(0, batch.size, micro):
            ids = batch.input_ids[i : i + micro].to(DEVICE)
            logits = model(input_ids=ids, attention_mask=batch.attention_mask[i : i + micro].to(DEVICE)).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            mask = batch.response_mask[i : i + micro, 1:].to(DEVICE)
            (-(batch.advantages[i : i + micro, None].to(DEVICE) * logp * mask).sum() / ntok).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync()
        if s >= 2:
            times.append(time.perf_counter() - start)
    bare = tokens / statistics.median(times)
    del model, opt
    if DEVICE == "cuda":
        torch.cuda.empty_cache()

    cfg = LearnerConfig(num_ranks=1, zero_stage=stage, micro_batch_size=micro, backend=BACKEND,
                        num_gpus_per_rank=1.0, num_threads=4, lr=1e-6, timeout_s=600.0)
    rank = make_rank(cfg, AlgoConfig(), path, "bfloat16", 100)
    wall = []
    for s in range(5):
        sync()
        start = time.perf_counter()
        step(rank, batch)
        sync()
        if s >= 2:
            wall.append(time.perf_counter() - start)
    learner = tokens / statistics.median(wall)
    overhead = bare / learner - 1
    report(f"bench zero{stage}/bf16 throughput", True,
           f"{n_params / 1e6:.0f}M params, {tokens:.0f} tokens/step: learner {learner:.0f} tokens/s, bare loop "
           f"{bare:.0f} tokens/s, overhead {100 * overhead:+.1f}% (goal <= +10%)")
    secs = []
    for _ in range(3):
        d = tempfile.mkdtemp(prefix="rlhf-sync-", dir="/dev/shm")
        try:
            paths, nbytes, s = rank.write_weights(d)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        secs.append(s)
    report(f"bench zero{stage}/bf16 weight gather+write", True,
           f"{nbytes / 1e9:.2f} GB in {len(paths)} bucket(s) to /dev/shm: " + ", ".join(f"{s:.2f}" for s in secs)
           + f" s ({nbytes / 1e9 / statistics.median(secs):.2f} GB/s)")
    shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the tiny test model folder (carried)")
    parser.add_argument("--check", type=int, choices=[2, 3], help="correctness checks at this ZeRO stage")
    parser.add_argument("--bench", type=int, choices=[2, 3], help="throughput/sync figures at this ZeRO stage")
    parser.add_argument("--bench-layers", type=int, default=16, help="layers of the benchmark model")
    parser.add_argument("--bench-hidden", type=int, default=1536, help="hidden size (1536 x 16 layers: ~0.46B)")
    parser.add_argument("--bench-rows", type=int, default=32, help="sequences of 512 tokens per step")
    parser.add_argument("--dry-run-cpu", action="store_true", help="run on CPU with gloo (checks the script)")
    args = parser.parse_args()
    global DEVICE, BACKEND
    if args.dry_run_cpu:
        DEVICE, BACKEND = "cpu", "gloo"
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "CPU dry run"
    print(f"torch {torch.__version__}, {name}", flush=True)
    try:
        if args.check:
            check_fp32(args.check, args.model)
            check_bf16(args.check, args.model)
        if args.bench:
            bench(args.model, args.bench, args.bench_layers, args.bench_hidden, args.bench_rows)
    except Exception:
        traceback.print_exc()
        FAILED.append("exception")
    print(f"{'ALL PASSED' if not FAILED else 'FAILED: ' + ', '.join(FAILED)}", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
