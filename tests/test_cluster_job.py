"""The README's cluster path for real: `ray start --head` on loopback, then `ray job submit
--working-dir . -- python -m rlhf.train ...` finishes with an exported model. About 95 s on the 2-core CI machine, so it runs in `make test`.

The head (tests/support/job_head.py) is the only node, on 127.0.0.1 with its own temp dir, ports
and token; the job's driver, engine and learner rank all run on it.
"""

from __future__ import annotations

import time

from support.job_head import job_head


def test_ray_job_submit_trains_and_exports(tmp_path):
    out_dir = tmp_path / "run"
    with job_head() as head:
        submit = [
            "--working-dir", ".", "--", "python", "-m", "rlhf.train", "+experiment=tiny_smoke",
            f"trainer.output_dir={out_dir}", "trainer.eval_prompts=0", "trainer.tensorboard=false",
            "reward.executor=ray",
        ]
        t0 = time.monotonic()
        job = head.job("submit", *submit, timeout_s=900)
        tail = "\n".join((job.stdout + job.stderr).splitlines()[-40:])
        print(" ".join(submit), f"\n({time.monotonic() - t0:.0f}s)\n{tail}")
        assert job.returncode == 0, tail
        assert "succeeded" in job.stdout, tail
        assert (out_dir / "export" / "model.safetensors").is_file(), tail
        assert (out_dir / "checkpoints" / "step-2" / "COMPLETE").is_file()
