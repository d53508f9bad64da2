"""Starting or joining Ray, bound to loopback unless configured otherwise."""

from __future__ import annotations

import os


def init_ray(address: str | None = None, bind_host: str = "127.0.0.1", num_cpus: int | None = None) -> None:
    """Join ``address`` (or $RAY_ADDRESS) when given; otherwise start a local head on ``bind_host``.

    Ray 2.60 generates its authentication token by itself; we never turn that off.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Actors import our packages from the driver's working tree; no upload needed on one machine.
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        _node_ip_address=bind_host,
        runtime_env=runtime_env,
        log_to_driver=True,
    )
