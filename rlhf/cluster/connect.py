"""Starting or joining Ray, bound to loopback unless configured otherwise."""

from __future__ import annotations

import os
from pathlib import Path


LOOPBACK = ("127.0.0.1", "localhost", "::1")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Never shipped: environments, run folders, caches, history (Ray also honours .gitignore).
SHIP_EXCLUDES = [".venv/", "runs/", "outputs/", "model_cache/", ".git/", "**/__pycache__/", "*.egg-info/",
                 ".pytest_cache/"]


def job_runtime_env() -> dict:
    """The runtime env the current Ray job was submitted with (``ray job submit --working-dir``
    sets it for the driver through RAY_JOB_CONFIG_JSON_ENV_VAR); {} outside a submitted job."""
    import json

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    return dict(json.loads(raw).get("runtime_env") or {}) if raw else {}


def attach_runtime_env(env_vars: dict[str, str]) -> dict:
    """The runtime env for joining an existing cluster: the project shipped as the working dir, so
    actors and tasks on other nodes import this code, unless the job already ships code (a second
    working_dir would conflict with it; Ray merges the env_vars)."""
    job = job_runtime_env()
    if job.get("working_dir") or job.get("py_modules"):
        return {"env_vars": env_vars}
    return {"env_vars": env_vars, "working_dir": str(PROJECT_ROOT), "excludes": SHIP_EXCLUDES}


def _keep_ray_on_loopback() -> None:
    """Make a local Ray head listen on loopback only.

    Ray 2.60 turns a loopback ``_node_ip_address`` into the machine's reachable address and its
    servers (GCS, raylet, workers) then listen on every interface. Its single-machine mode
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the default on macOS/Windows) keeps the node address,
    and so every server, on 127.0.0.1. Ray reads the variable when it is imported: set it for the
    processes Ray starts, and in this process too if Ray is already imported.
    tests/test_reliability_network.py lists the listening sockets to prove it.
    """
    import sys

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def protect_token_file() -> Path:
    """Ray 2.60 writes its authentication token to ~/.ray/auth_token (or $RAY_AUTH_TOKEN_PATH)
    readable by every local user (mode 0644), which would let any of them drive the cluster:
    keep the file to its owner (0600). Returns the path checked."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.is_file() and path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return path


def init_ray(address: str | None = None, bind_host: str = "127.0.0.1", num_cpus: int | None = None,
             log_to_driver: bool = True) -> None:
    """Join ``address`` (or $RAY_ADDRESS) when given, shipping the project (``attach_runtime_env``);
    otherwise start a local head on ``bind_host``.

    ``log_to_driver=False`` when the actors write their own log files (rlhf/console.py): Ray then
    forwards no worker output to this process; an actor's failure still arrives as an exception.
    Ray 2.60 generates its authentication token by itself; we never turn that off.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = {"TOKENIZERS_PARALLELISM": "false"}
    if address:
        ray.init(address=address, runtime_env=attach_runtime_env(env_vars), log_to_driver=log_to_driver)
    else:
        if bind_host in LOOPBACK:
            _keep_ray_on_loopback()
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            _node_ip_address=bind_host,
            # Actors import our packages from the driver's working tree: nothing to ship on one machine.
            runtime_env={"env_vars": env_vars},
            log_to_driver=log_to_driver,
        )
    protect_token_file()
