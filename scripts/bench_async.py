"""Asynchronous rollouts against the synchronous loop, same run: step wall time and the overlap.

    .venv/bin/python scripts/bench_async.py                      # tiny model, this machine, 6 steps each
    .venv/bin/python scripts/bench_async.py --cluster            # a simulated two-node Ray cluster
    .venv/bin/python scripts/bench_async.py --model smollm2-135m-instruct --steps 4

Each mode is one ``rlhf.train`` run with the same seed and config: trainer.max_staleness=0
(generate, then train) and trainer.max_staleness=1 with rollout_correction=tis (the engines sample
step s + 1 while the learner trains step s). ``--cluster`` runs both on a simulated cluster of two
worker raylets on loopback (tests/support/sim_cluster.py), the learner on one node and the engine
on the other (trainer.placement=separate, so weights go over the broadcast group). Both setups
share this machine's cores: the engine and the learner compete for them, so expect no gain here;
the gain needs nodes with cores of their own.

Printed: per mode the median step wall time over steps 2.. (step 1 has nothing to overlap), the
median time the sync waited for the batch in flight, and how much of the training time had
generation running beside it (from timeline.jsonl); then sync / async (> 1: async is faster), the
CPU model and flags and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln for ln in out.splitlines() if ln.startswith("Flags")), "")
    avx512 = sorted({f for f in flags.split() if f.startswith("avx512")})
    return f"{model}, {os.cpu_count()} cores, avx512: {' '.join(avx512) or 'none'}"


def overlap_share(spans: list[dict]) -> float:
    """Share of the train spans' time with a generate span running at the same moment."""
    gens = [(s["start"], s["end"]) for s in spans if s["phase"] == "generate"]
    total = covered = 0.0
    for t in (s for s in spans if s["phase"] == "train"):
        total += t["end"] - t["start"]
        covered += sum(max(0.0, min(t["end"], e) - max(t["start"], s)) for s, e in gens)
    return covered / total if total else 0.0


def run_mode(name: str, common: list[str], extra: list[str], out: Path) -> dict:
    from rlhf.run.metrics import read_metrics
    from rlhf.run.timeline import read_timeline
    from rlhf.train import train
    from tests.support.runs import compose

    run_dir = out / name
    train(compose(*common, *extra, f"trainer.output_dir={run_dir}"))
    steps = [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]
    later = steps[1:]
    return {
        "step_s": statistics.median(m["throughput/step_s"] for m in later),
        "wait_s": statistics.median(m.get("timing/wait_rollouts", 0.0) for m in later),
        "generate_s": statistics.median(m["timing/generate"] for m in later),
        "train_s": statistics.median(m["timing/train"] for m in later),
        "overlap": overlap_share(read_timeline(run_dir / "timeline.jsonl")),
        "reward": [round(m["reward/mean"], 3) for m in steps],
        "staleness": [m["async/staleness"] for m in steps],
        "run_dir": str(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--cluster", action="store_true", help="a simulated two-node cluster, placement separate")
    args = parser.parse_args()
    if args.cluster:  # before Ray is imported: the simulated nodes listen on loopback only
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

    from rlhf.models import resolve_model_path
    from tests.support.runs import axis_reward

    model_path = resolve_model_path(args.model)
    common = [f"model.name_or_path={args.model}", f"trainer.steps={args.steps}",
              f"trainer.prompts_per_step={args.prompts}", f"rollout.max_new_tokens={args.max_new_tokens}",
              "trainer.eval_prompts=0", "trainer.export_at_end=false", "trainer.tensorboard=false",
              "rollout.kv_cache_gb=0.5", "learner.micro_batch_size=16"]
    if args.model == "tiny-random-llama":  # a reward the random model can learn, weights that move
        common += ["rollout.top_k=8", "learner.lr=1e-2", "algo.max_mismatch_kl=null", axis_reward(model_path)]
    if args.cluster:
        common += ["trainer.placement=separate", "learner.num_cpus_per_rank=1", "rollout.num_cpus_per_engine=1"]
    modes = {"sync": ["trainer.max_staleness=0"], "async": ["trainer.max_staleness=1", "rollout_correction=tis"]}
    out = Path(tempfile.mkdtemp(prefix="bench-async-"))
    results = {}
    if args.cluster:
        from tests.support.sim_cluster import sim_cluster

        with sim_cluster([{"num_cpus": 1, "resources": {"node_a": 1}}, {"num_cpus": 1, "resources": {"node_b": 1}}]):
            for name, extra in modes.items():
                results[name] = run_mode(name, common, extra, out)
    else:
        from rlhf.cluster.connect import init_ray

        init_ray(num_cpus=4)
        for name, extra in modes.items():
            results[name] = run_mode(name, common, extra, out)

    where = "simulated two-node cluster (learner and engine on different raylets)" if args.cluster else "one machine"
    print(f"\n{args.model}, {args.steps} steps of {args.prompts} prompts x 8 samples x {args.max_new_tokens} "
          f"tokens, {where}")
    for name, r in results.items():
        print(f"  {name:5s}  step {r['step_s']:.2f} s (median of steps 2..)  generate {r['generate_s']:.2f} s  "
              f"train {r['train_s']:.2f} s  sync waited {r['wait_s']:.2f} s  train time with generation "
              f"beside it {r['overlap']:.0%}  staleness {r['staleness']}  reward {r['reward']}")
    print(f"  sync / async step time = {results['sync']['step_s'] / results['async']['step_s']:.2f}x")
    print(f"  CPU: {cpu()}; load average {os.getloadavg()[0]:.2f} (1 min)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
