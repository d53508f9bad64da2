"""What one learner restart costs: the same run with and without a learner rank SIGKILLed mid-step.

    .venv/bin/python scripts/bench_restart.py                                 # tiny model, 6 steps
    .venv/bin/python scripts/bench_restart.py --model smollm2 --steps 4 --kill-at 3

Two ``rlhf.train`` runs in this process (one Ray), same seed and config, a checkpoint every step:
"straight", and "killed", whose learner rank is SIGKILLed as soon as it runs train_step once
checkpoint ``kill-at - 1`` is complete; the learner group restarts (trainer.max_restarts) and
resumes from that checkpoint. Printed: each run's wall time (train() call; the first starts Ray),
the time from step 1's start to the last step's end and the difference, the
run's own faults/learner_seconds_lost (the redone part of the step and the restart up to the resumed
step's start), whether the final parameters are equal, the CPU model and the load average.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed_run(overrides: list[str], kill_after: Path | None) -> tuple[float, int]:
    from rlhf.train import train
    from tests.support.runs import compose, kill_descendant_running

    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        while not kill_after.exists() and not stop.is_set():
            stop.wait(0.05)
        kill_descendant_running("LearnerRank.train_step", killed, stop)

    thread = threading.Thread(target=killer, daemon=True)
    if kill_after is not None:
        thread.start()
    start = time.perf_counter()
    try:
        train(compose(*overrides))
    finally:
        stop.set()
        if kill_after is not None:
            thread.join()
    return time.perf_counter() - start, len(killed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"], help="a conf/model option")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--kill-at", type=int, default=3, help="the step whose train_step loses its rank")
    args = parser.parse_args()
    import torch
    from safetensors.torch import load_file

    from rlhf.models import TINY, resolve_model_path
    from tests.support.runs import axis_reward, steps_logged

    out = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    common = ["+experiment=tiny_smoke", f"trainer.steps={args.steps}", "trainer.save_every=1",
              "trainer.keep_last=1", "trainer.eval_prompts=0", "trainer.tensorboard=false",
              "trainer.export_at_end=true", f"model={args.model}"]
    if args.model == "tiny":  # the random model scores 0 on arithmetic: the tests' learnable reward instead
        common.append(axis_reward(resolve_model_path(TINY)))
    seconds = {}
    for name in ("straight", "killed"):
        marker = out / name / "checkpoints" / f"step-{args.kill_at - 1}" / "COMPLETE" if name == "killed" else None
        seconds[name], killed = timed_run([*common, f"trainer.output_dir={out / name}"], marker)
        if name == "killed" and killed != 1:
            raise SystemExit(f"the learner rank was killed {killed} times, not once: no measurement")
    # From step 1's start to the last step's end: the start-up (Ray, the first run's cold caches) left out.
    span = {}
    for name in seconds:
        logged = steps_logged(out / name)
        span[name] = logged[args.steps]["time"] - logged[1]["time"] + logged[1]["throughput/step_s"]
    lost = max(m["faults/learner_seconds_lost"] for m in steps_logged(out / "killed").values())
    a, b = (load_file(str(out / n / "export" / "model.safetensors")) for n in ("straight", "killed"))
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                  .stdout.splitlines() if ln.startswith("Model name")), "?")
    print(f"model {args.model}, {args.steps} steps, rank killed in step {args.kill_at}'s train_step")
    print(f"train() wall time: straight {seconds['straight']:.1f}s, killed {seconds['killed']:.1f}s (the first "
          "includes starting Ray)")
    print(f"steps 1..{args.steps}: straight {span['straight']:.1f}s, killed {span['killed']:.1f}s: one learner "
          f"restart cost {span['killed'] - span['straight']:.1f}s; faults/learner_seconds_lost={lost:.1f}s")
    print(f"final parameters equal: {equal}")
    print(f"cpu: {model}, {os.cpu_count()} cores; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
