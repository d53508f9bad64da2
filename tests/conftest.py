"""Shared fixtures: one Ray cluster per test session, model paths, shared engines."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _session_ray_token() -> None:
    """Ray's authentication token in a folder of this test session's own, never ~/.ray.

    Ray 2.60 reads the token from $RAY_AUTH_TOKEN_PATH (else ~/.ray/auth_token) and writes one only
    to ~/.ray when it starts a head and finds none; `ray start --head` with RAY_AUTH_MODE=token
    refuses instead. Tests that relied on a token some earlier run left in the home failed on a
    machine that never ran Ray. Every Ray process a test starts (ray.init, the simulated
    clusters, `ray start`, `ray job submit`) inherits this variable. The token is generated as Ray
    generates its own (256 random bits, hex) and kept to its owner (0600)."""
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    folder = Path(tempfile.mkdtemp(prefix="rlhf-tests-ray-"))
    token = folder / "auth_token"
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


_session_ray_token()


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from rlhf.models import TINY, resolve_model_path

    return resolve_model_path(TINY)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from rlhf.models import SMOLLM2, resolve_model_path

    return resolve_model_path(SMOLLM2)


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once for the whole test session (loopback, 2 CPUs of bookkeeping)."""
    import ray

    from rlhf.cluster.connect import init_ray

    init_ray(num_cpus=max(4, os.cpu_count() or 2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_api_server(tiny_model_path, tmp_path_factory):
    """The tiny model behind vLLM's OpenAI-compatible server on 127.0.0.1 with an API key, served as
    "tiny"; one for the whole session (~30-60 s to start on 2 cores). Yields tests.support.vllm_server.Served."""
    from tests.support.vllm_server import vllm_api_server

    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    with vllm_api_server(tiny_model_path, "tiny", "sk-vllm-" + secrets.token_hex(16), log) as served:
        yield served
