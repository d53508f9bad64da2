"""GRPO step wall time: this framework against TRL's GRPOTrainer, same model, prompts, reward and machine.

One step is 4 prompts x 8 samples x up to 64 new tokens, no KL (beta=0), fp32 on CPU. Both run in
child processes, one after the other:

- ours: ``python -m rlhf.train`` end to end (Ray, vLLM engine, DeepSpeed learner, weight sync);
  a step's time is the sum of its ``timing/*`` entries in ``metrics.jsonl`` (generate, score,
  train, sync, ...). Start-up (Ray, engine, learner) and tear-down are reported separately.
- TRL: GRPOTrainer (``scripts/bench_support/trl_half.py``) installed with ``pip --no-deps`` into a
  throw-away folder, never into the project venv; transformers ``generate`` (no vLLM), no gradient
  checkpointing, the same learning rate, two micro-batches of 16 a step as our learner; a step is
  on_step_begin -> on_step_end.

Both get the same arithmetic prompts in the same order ("What is a + b?", drawn by ``rlhf.experience.prompts`` as
the demo run draws them, chat-templated by each framework) and the same reward (the built-in
``math_answer``, last-number mode). Step 1 is warm-up and excluded; steps 2..N are averaged. The
table shows s/step (mean ± std), completion tokens per step (the two sample different completions,
so lengths differ) and the ratio TRL / ours (goal: >= 2x on an AVX-512 CPU, >= 3x on an AVX2-only
one, where transformers' generate is slower). Beside it, this machine's fp32 matmul ceiling
(measured first, in this process) and our training and generation FLOP/s as a share of it.
``--lora-rank R``: both train peft LoRA adapters (same LoraConfig), LoRA's own row.

    .venv/bin/python scripts/bench_step.py                         # SmolLM2-135M, 4 steps each
    .venv/bin/python scripts/bench_step.py --model tiny --steps 2  # quick check of the script
    .venv/bin/python scripts/bench_step.py --skip-trl --keep-tmp   # ours only; keep the run folder
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TRL_HALF = REPO / "scripts" / "bench_support" / "trl_half.py"
ALIASES = {"tiny": "tiny-random-llama", "smollm2": "smollm2-135m-instruct"}
PROMPTS_PER_STEP, SAMPLES, MAX_NEW_TOKENS = 4, 8, 64


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="GRPO steps per framework; step 1 is warm-up")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="built-in name (smollm2-135m-instruct, tiny-random-llama; 'tiny' for short) or HF folder")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate of both")
    p.add_argument("--trl-version", default="1.16.*")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary folder (logs, run folders)")
    p.add_argument("--verbose", action="store_true", help="echo the children's whole output")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="both train peft LoRA adapters of this rank (model.lora.rank; TRL's peft_config)")
    args = p.parse_args()
    if args.steps < 2:
        p.error(f"--steps={args.steps}: need at least 2 (step 1 is warm-up and not measured)")
    if args.skip_trl and args.skip_ours:
        p.error("--skip-trl and --skip-ours together leave nothing to measure")
    args.model = ALIASES.get(args.model, args.model)
    return args


@dataclass
class Result:
    name: str
    step_s: list[float]  # every step, warm-up included
    tokens: list[float]  # completion tokens generated per step
    startup_s: float  # process wall time outside the steps (imports, engines, model load, tear-down)
    train_tokens_s: float = float("nan")  # sequence tokens per second of the update (ours only)
    generate_tokens_s: float = float("nan")  # completion tokens per second of generation (ours only)

    def measured(self) -> list[float]:
        return self.step_s[1:]

    def mean(self) -> float:
        return statistics.fmean(self.measured())

    def std(self) -> float:
        return statistics.stdev(self.measured()) if len(self.measured()) > 1 else 0.0


def run_child(tag: str, cmd: list[str], log_path: Path, env: dict[str, str], verbose: bool,
              echo_prefix: tuple[str, ...]) -> float:
    """Run ``cmd`` from the repo root, log everything to ``log_path``; returns its wall seconds."""
    print(f"[{tag}] {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            if verbose or line.startswith(echo_prefix):
                print(f"[{tag}] {line.rstrip()}", flush=True)
        rc = proc.wait()
    wall = time.perf_counter() - start
    if rc != 0:
        tail = log_path.read_text(encoding="utf-8").splitlines()[-40:]
        raise SystemExit(f"[{tag}] exited with {rc} after {wall:.0f} s; last lines of {log_path}:\n"
                         + "\n".join(tail))
    return wall


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **extra)
    env.pop("RAY_ADDRESS", None)  # ours starts its own local Ray head, not someone else's cluster
    return env


def draw_prompts(model_path: str, steps: int) -> list[dict[str, str]]:
    """The prompts ``rlhf.train`` serves in its steps, in order: the demo's data group, as it draws them."""
    import datasets
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from rlhf.config import DataConfig
    from rlhf.experience.prompts import PromptDataset

    datasets.disable_progress_bars()
    group = OmegaConf.load(REPO / "conf" / "data" / "arithmetic.yaml")
    group.pop("defaults", None)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), group))
    data = PromptDataset.from_config(cfg, AutoTokenizer.from_pretrained(model_path), split="train")
    items = data.next_batch(steps * PROMPTS_PER_STEP)
    return [{"prompt": it.raw_prompt, "answer": it.columns["answer"]} for it in items]


def install_trl(target: Path, version: str) -> list[str]:
    """pip-install TRL (no deps) into ``target``; add there any required dependency the venv lacks."""
    pip = [PYTHON, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
    subprocess.run([*pip, f"trl=={version}"], check=True)
    from packaging.requirements import Requirement

    meta = importlib.metadata.Distribution.at(next(target.glob("trl-*.dist-info")))
    missing, notes = [], []
    for spec in meta.requires or []:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an optional extra
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(str(req))
            continue
        if not req.specifier.contains(have, prereleases=True):
            # Installing another version beside the venv's would shadow it for TRL's half only.
            notes.append(f"{req.name} {have} does not satisfy TRL's {req}; using the venv's anyway")
    if missing:
        subprocess.run([*pip, *missing], check=True)
        notes.append(f"installed beside TRL (--no-deps): {', '.join(missing)}")
    return notes


def bench_trl(args: argparse.Namespace, model_path: str, tmp: Path) -> Result:
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in draw_prompts(model_path, args.steps)))
    site = tmp / "trl"
    for note in install_trl(site, args.trl_version):
        print(f"[trl] {note}")
    version = importlib.metadata.Distribution.at(next(site.glob("trl-*.dist-info"))).version
    out = tmp / "trl_result.json"
    cmd = [PYTHON, str(TRL_HALF), "--model-path", model_path, "--prompts", str(prompts),
           "--prompts-per-step", str(PROMPTS_PER_STEP), "--steps", str(args.steps),
           "--max-new-tokens", str(MAX_NEW_TOKENS), "--lr", str(args.lr), "--work-dir", str(tmp / "trl_out"),
           "--out", str(out), "--lora-rank", str(args.lora_rank)]
    pythonpath = os.pathsep.join(p for p in [str(site), str(REPO), os.environ.get("PYTHONPATH", "")] if p)
    wall = run_child(f"trl {version}", cmd, tmp / "trl.log", child_env(PYTHONPATH=pythonpath),
                     args.verbose, ("trl step",))
    res = json.loads(out.read_text())
    if len(res["step_s"]) != args.steps:
        raise SystemExit(f"[trl] timed {len(res['step_s'])} steps, expected {args.steps}; see {tmp / 'trl.log'}")
    print(f"[trl] set-up (imports, model, trainer) {res['setup_s']:.1f} s; torch threads {res['torch_threads']}")
    return Result(f"TRL {version} GRPOTrainer{_lora(args)}", res["step_s"], res["tokens"], wall - sum(res["step_s"]))


def bench_ours(args: argparse.Namespace, model_path: str, tmp: Path) -> Result:
    run_dir = tmp / "ours"
    cmd = [PYTHON, "-m", "rlhf.train",
           f"model.name_or_path={model_path}",
           f"trainer.steps={args.steps}",
           f"trainer.prompts_per_step={PROMPTS_PER_STEP}",
           f"rollout.n={SAMPLES}",
           f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
           "trainer.eval_prompts=0",
           "trainer.export_at_end=false",
           "algo.kl_coef=0",
           f"learner.lr={args.lr}",
           "trainer.seed=0",
           f"trainer.output_dir={run_dir}",
           f"model.lora.rank={args.lora_rank}"]
    wall = run_child("ours", cmd, tmp / "ours.log", child_env(), args.verbose, ("step ", "eval", "config error"))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m for m in lines if any(k.startswith("timing/") for k in m) and "timing/eval" not in m]
    if len(steps) != args.steps:
        raise SystemExit(f"[ours] {len(steps)} step lines in {run_dir / 'metrics.jsonl'}, expected {args.steps}")
    step_s = [sum(v for k, v in m.items() if k.startswith("timing/") and v is not None) for m in steps]
    phases = sorted({k for m in steps[1:] for k in m if k.startswith("timing/")})
    print("[ours] mean phase times over steps 2..N: " + ", ".join(
        f"{k.split('/', 1)[1]} {statistics.fmean(m.get(k) or 0.0 for m in steps[1:]):.2f} s" for k in phases))
    tokens = [m.get("throughput/generated_tokens", float("nan")) for m in steps]
    generate_s = sum(m["timing/generate"] for m in steps[1:])
    return Result(f"ours (rlhf.train){_lora(args)}", step_s, tokens, wall - sum(step_s),
                  train_tokens_s=statistics.fmean(m["tokens/s"] for m in steps[1:]),
                  generate_tokens_s=sum(tokens[1:]) / generate_s)


def _lora(args: argparse.Namespace) -> str:
    return f", LoRA r={args.lora_rank}" if args.lora_rank > 0 else ""


def matmul_gflops(threads: int = 2, n: int = 2048, repeats: int = 20) -> float:
    """This machine's fp32 matmul ceiling: the best of ``repeats`` n x n products on ``threads``
    threads (2 n^3 FLOPs each). Measured in this process before and after the children run, and
    the better kept: a background burst during one measurement must not lower the ceiling."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def cpu_model() -> str:
    """``lscpu``'s model name and its avx512 flags: machines here differ 2-3x."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "?")
    flags = sorted({f for f in text.split() if f.startswith("avx512")})
    return f"{name}; {', '.join(flags) if flags else 'no avx512 (AVX2 class)'}"


def report(results: list[Result], args: argparse.Namespace, ceiling_gflops: float, num_params: int) -> None:
    print(f"\nGRPO step, {args.model}: {PROMPTS_PER_STEP} prompts x {SAMPLES} samples x <= {MAX_NEW_TOKENS} "
          f"new tokens, beta=0, fp32 CPU; mean over steps 2..{args.steps} (step 1 is warm-up)")
    print(f"machine: {cpu_model()}; {os.cpu_count()} cores; load average at the end {os.getloadavg()[0]:.2f} (1 min)")
    head = f"{'':28} {'s/step':>16} {'step 1 s':>9} {'tokens/step':>12} {'start-up s':>11}"
    print(head)
    print("-" * len(head))
    for r in results:
        toks = r.tokens[1:] if len(r.tokens) == len(r.step_s) else r.tokens
        tok_txt = f"{statistics.fmean(toks):.0f}" if toks else "n/a"
        print(f"{r.name:28} {r.mean():8.2f} ± {r.std():5.2f} {r.step_s[0]:9.1f} {tok_txt:>12} {r.startup_s:11.1f}")
    if len(results) == 2:
        trl, ours = results
        ratio = trl.mean() / ours.mean()
        goal = 2.0 if "avx512f" in cpu_model() else 3.0
        verdict = "meets" if ratio >= goal else "misses"
        print(f"ratio TRL / ours: {ratio:.2f}x ({verdict} this CPU class's goal of >= {goal:.0f}x)")
    for r in results:
        if r.train_tokens_s == r.train_tokens_s:  # measured (not NaN)
            # Training ~ 6 x params FLOPs per token (forward 2, backward 4); with LoRA ~ 4 (the
            # backward still runs through the frozen weights but computes no gradient for them).
            # Tokens are whole sequences, as a plain pass computes them (shared prompts compute
            # fewer). Generation ~ 2 x params per generated token.
            train = (4 if args.lora_rank > 0 else 6) * num_params * r.train_tokens_s / 1e9
            gen = 2 * num_params * r.generate_tokens_s / 1e9
            print(f"{r.name}: fp32 matmul ceiling {ceiling_gflops:.0f} GFLOP/s (2 threads); training "
                  f"{r.train_tokens_s:.0f} tokens/s = {train:.1f} GFLOP/s ({train / ceiling_gflops:.0%} of it); "
                  f"generation {r.generate_tokens_s:.0f} tokens/s = {gen:.1f} GFLOP/s "
                  f"({gen / ceiling_gflops:.0%})")


def main() -> None:
    args = parse_args()
    from rlhf.models import resolve_model_path

    from rlhf.plan import count_params

    model_path = str(resolve_model_path(args.model))
    ceiling = matmul_gflops()
    tmp = Path(tempfile.mkdtemp(prefix="bench_step-"))
    print(f"temporary folder: {tmp}")
    results, finished = [], False
    try:
        if not args.skip_trl:
            results.append(bench_trl(args, model_path, tmp))
        if not args.skip_ours:
            results.append(bench_ours(args, model_path, tmp))
        report(results, args, max(ceiling, matmul_gflops()), count_params(model_path, False))
        finished = True
    finally:
        if args.keep_tmp or not finished:  # a failed run keeps its logs
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
