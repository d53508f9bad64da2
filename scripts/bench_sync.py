"""Weight sync benchmark: the broadcast transport against the /dev/shm file transport, same run.

    .venv/bin/python scripts/bench_sync.py                       # SmolLM2-135M fp32, ZeRO-2, 1 rank, 1 engine
    .venv/bin/python scripts/bench_sync.py --rounds 8 --stage 3 --ranks 2

One learner group and one real vLLM engine; both transports are built on them (the file transport
writes safetensors buckets into learner.sync_dir and the engine reads them; the broadcast
transport sends each bucket over a gloo group to the engine's worker). Rounds alternate files,
broadcast, files, ... so both see the same background load, after one untimed warm-up round each.
A round is the transport's whole send: gather + write/broadcast + the engine's reload. The probe
check runs after every round (untimed) so a fast but wrong transport cannot pass.

Printed: seconds and GB/s per round and the medians, and the ratio files / broadcast (> 1: the
broadcast is faster). Goal: the broadcast no slower than files on one machine (ratio >= 1).
GB/s counts the bytes each transport moved: files also writes the tied output head (SmolLM2:
49,152 x 576 fp32, 113 MB) which the broadcast leaves to the worker to copy.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per transport")
    parser.add_argument("--bucket-mb", type=int, default=256)
    args = parser.parse_args()

    import ray

    from rlhf.cluster.connect import init_ray
    from rlhf.config import AlgoConfig, LearnerConfig, RolloutConfig
    from rlhf.learner import LearnerGroup
    from rlhf.learner.sync import BroadcastTransport, FileTransport
    from rlhf.models import resolve_model_path
    from rollouts.group import EngineGroup
    from transformers import AutoTokenizer

    path = resolve_model_path(args.model)
    probe = AutoTokenizer.from_pretrained(path)("What is 12 + 7? Think step by step.")["input_ids"]
    init_ray(num_cpus=4)
    cfg = LearnerConfig(num_ranks=args.ranks, zero_stage=args.stage, micro_batch_size=4, num_threads=2,
                        lr=1e-6, timeout_s=600.0, sync_bucket_mb=args.bucket_mb)
    learner = LearnerGroup(cfg, AlgoConfig(), path, "float32", False, total_updates=10)
    engines = EngineGroup(RolloutConfig(num_engines=1, max_model_len=512, kv_cache_gb=0.25, timeout_s=600.0),
                          path, "float32")
    transports = [FileTransport(learner.ranks, cfg), BroadcastTransport(learner.ranks, cfg, engines)]
    times: dict[str, list[float]] = {t.name: [] for t in transports}
    moved: dict[str, int] = {}
    try:
        for round_ in range(args.rounds + 1):  # round 0: warm-up, untimed
            for t in transports:
                start = time.perf_counter()
                sent = t.send(engines)
                seconds = time.perf_counter() - start
                gap = learner.check_probe(engines, probe, tolerance=1e-3)
                moved[t.name] = sent.num_bytes
                label = "warm-up" if round_ == 0 else f"round {round_}"
                print(f"  {label} {t.name:9s}: {seconds:.3f} s, {sent.num_bytes / 1e9 / seconds:.2f} GB/s "
                      f"({sent.num_bytes / 1e6:.0f} MB), probe gap {gap:.1e}", flush=True)
                if round_ > 0:
                    times[t.name].append(seconds)
        for name, secs in times.items():
            med = statistics.median(secs)
            print(f"{name}: median {med:.3f} s, {moved[name] / 1e9 / med:.2f} GB/s over {len(secs)} rounds "
                  f"(min {min(secs):.3f} s, max {max(secs):.3f} s)")
        ratio = statistics.median(times["files"]) / statistics.median(times["broadcast"])
        print(f"files / broadcast median seconds: {ratio:.2f} (goal >= 1: broadcast no slower)")
    finally:
        transports[1].close()
        learner.shutdown()
        engines.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
