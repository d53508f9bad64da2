"""Start Ray as the trainer does (rlhf.cluster.connect.init_ray), start one actor so a worker process
exists, print what the test needs as one JSON line, then wait until stdin closes."""

import json
import os
import sys

import ray
from ray._raylet import AuthenticationMode, get_authentication_mode

from rlhf.cluster.connect import init_ray


@ray.remote(num_cpus=0)
class Idle:
    def pid(self) -> int:
        return os.getpid()


if __name__ == "__main__":
    init_ray()
    actor = Idle.remote()
    print(json.dumps({
        "gcs_address": ray.get_runtime_context().gcs_address,
        "token_auth": get_authentication_mode() == AuthenticationMode.TOKEN,
        "actor_pid": ray.get(actor.pid.remote()),
    }), flush=True)
    sys.stdin.read()
