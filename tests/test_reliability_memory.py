"""Memory under load: resident memory of the driver, the learner rank and the rollout engine over
a 30-step run of the tiny model (docs/reliability.md, point 11, with the recorded figures).

The run is the real loop in-process; a thread samples each process's RSS (psutil) whenever a new
step appears in metrics.jsonl. A single sample swings with the allocator (the learner's by up to
~90 MiB between steps: one step's [B, L, 49152] logits are ~60 MB), so growth is the peak of steps
21-30 minus the peak of steps 6-15 (after warm-up); a leak of even a few MiB a step adds up over
the 15 steps between the windows. It must stay under GROWTH_BOUND_MIB for every process.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import psutil
import pytest

from rlhf.train import train
from support.runs import axis_reward, compose, steps_logged

STEPS = 30
EARLY, LATE = range(6, 16), range(21, 31)
GROWTH_BOUND_MIB = 64  # per process (the figures are in docs/reliability.md)


def roles() -> dict[str, list[psutil.Process]]:
    """This test's processes by role: the driver (this pytest process), the learner rank actor,
    and the engine actor with its vLLM engine-core process (counted together)."""
    me = psutil.Process(os.getpid())
    found: dict[str, list[psutil.Process]] = {"driver": [me], "learner": [], "engine": []}
    for p in me.children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        if title.startswith("ray::LearnerRank"):
            found["learner"].append(p)
        elif title.startswith("ray::RolloutEngine"):
            found["engine"] += [p, *p.children(recursive=True)]
    return found


def rss_mib(processes: list[psutil.Process]) -> float:
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


@pytest.mark.slow
def test_resident_memory_stays_flat_over_30_steps(ray_session, tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    samples: dict[int, dict[str, float]] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for step in set(steps_logged(run_dir)) - set(samples):
                samples[step] = {role: rss_mib(ps) for role, ps in roles().items()}
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        train(compose("+experiment=tiny_smoke", f"trainer.output_dir={run_dir}", f"trainer.steps={STEPS}",
                      "trainer.eval_prompts=0", "trainer.export_at_end=false", "rollout.top_k=8",
                      "learner.lr=1e-3", axis_reward(tiny_model_path)))
    finally:
        stop.set()
        sampler.join()
    Path(tmp_path / "rss_mib.json").write_text(json.dumps(samples, indent=1))
    print("RSS MiB by step:", json.dumps({s: samples[s] for s in sorted(samples)}))
    assert sorted(samples) == list(range(1, STEPS + 1))
    for role in ("driver", "learner", "engine"):
        early = max(samples[s][role] for s in EARLY)
        late = max(samples[s][role] for s in LATE)
        print(f"{role}: peak RSS steps 6-15 {early:.1f} MiB, steps 21-30 {late:.1f} MiB, growth {late - early:+.1f}")
        assert early > 50, (role, early)  # the process was found and measured
        assert late - early < GROWTH_BOUND_MIB, (role, early, late)
