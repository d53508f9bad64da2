"""The calculator task two ways, side by side: the built-in environment (``+experiment=calculator_arithmetic``,
rollouts/env/) against the same tool loop written as an application that talks to the gateway with
the OpenAI client (``+experiment=calculator_agent``, rlhf/experience/agents.py). Same model, data,
sampling, seeds and steps; one run after the other, nothing else running.

Prints, per evaluation step, the held-out accuracy of each, and the mean step time and generation
time of each with their ratio (agent / environment), naming the CPU and the load average; writes
the numbers to ``--out`` (JSON).

    .venv/bin/python scripts/bench_agent_vs_env.py                              # SmolLM2, 4 steps
    .venv/bin/python scripts/bench_agent_vs_env.py --model tiny-random-llama --steps 2       # plumbing only
    .venv/bin/python scripts/bench_agent_vs_env.py data.arithmetic.min_operand=0 data.arithmetic.max_operand=9 \
        'data.arithmetic.ops=[+]' data.arithmetic.num_terms=2          # single-digit sums, SmolLM2 can learn
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = {"env": "calculator_arithmetic", "agent": "calculator_agent"}


def run_side(experiment: str, out: Path, args: argparse.Namespace) -> dict:
    overrides = [
        f"+experiment={experiment}", f"model.name_or_path={args.model}", f"trainer.output_dir={out}",
        f"trainer.steps={args.steps}", f"trainer.prompts_per_step={args.prompts}",
        f"trainer.eval_prompts={args.eval_prompts}", f"trainer.eval_samples={args.eval_samples}",
        f"trainer.eval_every={args.eval_every}", "trainer.save_every=0", "trainer.export_at_end=false",
        "trainer.tensorboard=false", *args.overrides,
    ]
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run([sys.executable, "-m", "rlhf.train", *overrides], cwd=ROOT, check=True, stdout=log,
                       stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    steps = [r for r in rows if "throughput/step_s" in r]
    mean = lambda key: sum(r[key] for r in steps) / len(steps)  # noqa: E731
    return {"experiment": experiment, "wall_s": wall, "eval_accuracy": evals,
            "step_s_mean": mean("throughput/step_s"), "generate_s_mean": mean("timing/generate"),
            "gateway": {k: mean(k) for k in steps[0] if k.startswith(("gateway/", "agent/"))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "agent_vs_env.json")
    parser.add_argument("overrides", nargs="*", help="more hydra overrides for both sides (e.g. another task)")
    args = parser.parse_args()
    from rlhf.compare import machine

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="agent_vs_env-") as tmp:
        got = {side: run_side(exp, Path(tmp) / side, args) for side, exp in SIDES.items()}
    result = {"machine": machine(), "load_average_before": load_before, "settings": vars(args) | {"out": str(args.out)},
              **got}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    env, agent = got["env"], got["agent"]
    print(f"machine: {result['machine']['cpu']}, {result['machine']['cpu_count']} cores; load average "
          f"{load_before:.2f} before, {result['machine']['load_average'][0]:.2f} after (1 min)")
    print(f"{args.model}, {args.steps} steps x {args.prompts} prompts; held-out {args.eval_prompts} x {args.eval_samples}")
    print(f"{'step':>5} {'env accuracy':>13} {'agent accuracy':>15}")
    for step in sorted(env["eval_accuracy"]):
        print(f"{step:>5} {env['eval_accuracy'][step]:>13.3f} {agent['eval_accuracy'].get(step, float('nan')):>15.3f}")
    for key, name in (("step_s_mean", "step time"), ("generate_s_mean", "generate time")):
        print(f"{name:>14}: env {env[key]:.1f} s, agent {agent[key]:.1f} s, ratio agent/env {agent[key] / env[key]:.2f}")
    for key, value in agent["gateway"].items():
        print(f"  {key} (mean per step): {value:.3f}")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
