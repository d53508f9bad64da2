"""What a lost engine and a lost learner rank cost a run: the same command three times in this process
(one Ray), same seed and config, a checkpoint every step, nothing else running:

- ``straight``: uninterrupted;
- ``engine``: the rollout engine's process (and its children) SIGKILLed as soon as it runs the
  generate of step ``--kill-at`` (once checkpoint ``kill-at - 1`` is complete). The engine group
  replaces it, the learner sends it the current weights, and its chunk is sampled again;
- ``learner``: the learner rank SIGKILLed as soon as it runs that step's train_step. The learner
  group restarts and resumes from checkpoint ``kill-at - 1``.

Printed per fault: steps 1..N's wall time (from step 1's start: Ray's start-up and the first run's
cold caches left out) against the straight run's and the difference, the run's own
faults/*_seconds_lost, whether the final parameters are equal to the straight run's, the CPU and
the load average. Written to ``--out`` (JSON).

    .venv/bin/python scripts/bench_faults.py                              # tiny model, 6 steps
    .venv/bin/python scripts/bench_faults.py --model smollm2 --steps 4 --kill-at 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# What is killed: the process Ray titles with the method (and its children: an engine's vLLM processes).
TARGETS = {"engine": "RolloutEngine.generate", "learner": "LearnerRank.train_step"}


def run(overrides: list[str], fault: str | None, kill_after: Path) -> int:
    """One train() run; returns how many processes were killed."""
    from rlhf.train import train
    from tests.support.runs import compose, kills

    with kills([(kill_after, TARGETS[fault])] if fault is not None else []) as killed:
        train(compose(*overrides))
    return len(killed)


def machine() -> dict:
    name = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                 .stdout.splitlines() if ln.startswith("Model name")), "?")
    flags = Path("/proc/cpuinfo").read_text()
    return {"cpu": name, "cores": os.cpu_count(), "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "load_average": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"], help="a conf/model option")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--kill-at", type=int, default=3, help="the step that loses its engine or rank")
    parser.add_argument("--out", type=Path, default=None, help="JSON of the numbers (default: print only)")
    args = parser.parse_args()
    import torch
    from safetensors.torch import load_file

    from rlhf.models import TINY, resolve_model_path
    from tests.support.runs import axis_reward, steps_logged

    out = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    common = ["+experiment=tiny_smoke", f"trainer.steps={args.steps}", "trainer.save_every=1",
              "trainer.keep_last=1", "trainer.eval_prompts=0", "trainer.tensorboard=false",
              "trainer.export_at_end=true", "rollout.top_k=8", f"model={args.model}"]
    if args.model == "tiny":  # the random model scores 0 on arithmetic: the tests' learnable reward instead
        common.append(axis_reward(resolve_model_path(TINY)))
    result = {"model": args.model, "steps": args.steps, "kill_at": args.kill_at, "machine_before": machine()}
    spans, params = {}, {}
    for name in ("straight", "engine", "learner"):
        marker = out / name / "checkpoints" / f"step-{args.kill_at - 1}" / "COMPLETE"
        killed = run([*common, f"trainer.output_dir={out / name}"], None if name == "straight" else name, marker)
        if name != "straight" and killed != 1:
            raise SystemExit(f"{name}: killed {killed} processes, not one: no measurement")
        logged = steps_logged(out / name)
        spans[name] = logged[args.steps]["time"] - logged[1]["time"] + logged[1]["throughput/step_s"]
        params[name] = {k: v for shard in sorted((out / name / "export").glob("*.safetensors"))
                        for k, v in load_file(str(shard)).items()}  # SmolLM2's export comes in shards
        if name != "straight":
            a, b = params["straight"], params[name]
            result[name] = {
                "steps_s": spans[name], "straight_steps_s": spans["straight"],
                "extra_s": spans[name] - spans["straight"],
                "seconds_lost_logged": logged[args.steps][f"faults/{name}_seconds_lost"],
                "restarts_logged": logged[args.steps][f"faults/{name}_restarts"],
                "params_equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
            }
            r = result[name]
            print(f"{args.model}, {args.steps} steps, {name} killed in step {args.kill_at}: steps 1..{args.steps} "
                  f"{r['steps_s']:.1f}s vs {r['straight_steps_s']:.1f}s uninterrupted (+{r['extra_s']:.1f}s, "
                  f"{r['steps_s'] / r['straight_steps_s']:.2f}x); faults/{name}_seconds_lost="
                  f"{r['seconds_lost_logged']:.1f}s; final parameters equal: {r['params_equal']}", flush=True)
    result["machine_after"] = machine()
    print(f"machine: {result['machine_after']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
