"""Nothing listens beyond loopback, and Ray's token authentication stays on (docs/reliability.md,
point 10). Sockets are read from the operating system (psutil), not from any configuration.
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import subprocess
import sys
import threading

import psutil
import pytest

from rlhf.cluster.connect import protect_token_file
from rlhf.train import train
from support.runs import ROOT, TrainProcess, compose


def listening(processes) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of ``processes``."""
    found = set()
    for p in processes:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((p.name(), c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # '::ffff:127.0.0.1' on a dual-stack socket
    return (mapped or ip).is_loopback


@pytest.fixture
def ray_head(tmp_path):
    """rlhf.cluster.connect.init_ray in its own process tree, with one actor; yields (info, process)."""
    head = TrainProcess([], tmp_path / "head.log", python_args=(str(ROOT / "tests" / "support" / "ray_head.py"),))
    try:
        assert head.wait_until(lambda: head.output().rstrip().endswith("}"), timeout_s=300), head.output()[-3000:]
        info = json.loads(head.output().rstrip().splitlines()[-1])
        yield info, head
    finally:
        assert head.close() == []


def test_ray_head_and_workers_listen_on_loopback_only(ray_head):
    info, head = ray_head
    head.track()
    sockets = listening(head.seen.values())
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the servers were found and inspected
    assert info["actor_pid"] in head.seen  # the actor's worker process too
    assert [s for s in sockets if not is_loopback(s[1])] == []
    assert info["gcs_address"].startswith("127.0.0.1:")


def connect(gcs_address: str, env: dict[str, str], timeout_s: float = 60) -> str:
    """Output of a separate driver that tries ray.init(address=...); killed after ``timeout_s``
    (a rejected driver keeps retrying, logging each refusal)."""
    code = f"import ray; ray.init(address={gcs_address!r}); print('CONNECTED', flush=True)"
    # Clients of a loopback head need Ray's single-machine mode too, or they dial the public IP.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **env}
    client = subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        return client.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        client.kill()
        return client.communicate()[0]


def test_ray_token_authentication_is_on_and_enforced(ray_head, tmp_path):
    info, _ = ray_head
    assert info["token_auth"]
    # Without the token (an empty home: no ~/.ray/auth_token) the GCS refuses the driver.
    refused = connect(info["gcs_address"], {"HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"}, timeout_s=20)
    assert "CONNECTED" not in refused
    assert "InvalidAuthToken" in refused, refused[-2000:]
    # With it, the same address accepts a driver: the refusal was the token, not the network.
    accepted = connect(info["gcs_address"], {"RAY_AUTH_MODE": "token"})
    assert "CONNECTED" in accepted, accepted[-2000:]


def test_ray_token_file_is_readable_by_its_owner_only(ray_session):
    # Ray writes the token 0644; init_ray (this session's) left it 0600.
    token = protect_token_file()
    assert token.is_file() and stat.S_IMODE(token.stat().st_mode) == 0o600
    token.chmod(0o644)  # as Ray writes it
    protect_token_file()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


def test_a_training_run_listens_on_loopback_only(ray_session, tmp_path):
    """Every process of a real run (this driver, the session's Ray started by init_ray, the
    learner rank with its torch.distributed store, the vLLM engine and its engine-core process),
    sampled while the run goes."""
    seen: set[tuple[str, str, int]] = set()
    stop = threading.Event()

    def watch() -> None:
        me = psutil.Process(os.getpid())
        while not stop.is_set():
            seen.update(listening([me, *me.children(recursive=True)]))
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        train(compose("+experiment=tiny_smoke", f"trainer.output_dir={tmp_path / 'run'}", "trainer.steps=1",
                      "trainer.eval_prompts=0", "trainer.tensorboard=false", "trainer.export_at_end=false"))
    finally:
        stop.set()
        watcher.join()
    names = {name for name, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names, seen
    outside = sorted(s for s in seen if not is_loopback(s[1]))
    assert outside == [], f"listening beyond loopback: {outside}"
