"""The storage rule (rlhf/cluster/storage.py) and code shipping (rlhf/cluster/connect.py) for runs on a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ray import cloudpickle

from rlhf.cluster.connect import PROJECT_ROOT, attach_runtime_env
from rlhf.cluster.node import SharedPath, this_node, unseen
from rlhf.cluster.storage import MARKER, StorageError, absolute_paths, check_shared_storage
from rlhf.config import Config
from rlhf.learner.rank import LearnerRank
from rollouts.engine import RolloutEngine


class RankRPCs:
    """A Ray actor with the learner rank's own storage RPCs (LearnerRank builds DeepSpeed; not needed)."""

    node = LearnerRank.node
    can_see = LearnerRank.can_see


class EngineRPCs:
    """The same for a rollout engine's (RolloutEngine builds vLLM)."""

    node = RolloutEngine.node
    can_see = RolloutEngine.can_see


# The classes above live in this test module, which Ray's workers cannot import: ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_run_folder_cache_and_local_model_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    cfg = Config()
    cfg.trainer.output_dir, cfg.model.name_or_path, cfg.model.cache_dir = "runs/a", "my-model", "cache"
    out = absolute_paths(cfg)
    assert out.trainer.output_dir == str(tmp_path / "runs" / "a")
    assert out.model.name_or_path == str(tmp_path / "my-model")
    assert out.model.cache_dir == str(tmp_path / "cache")
    assert cfg.trainer.output_dir == "runs/a"  # the composed config itself is left as it was
    cfg.model.name_or_path = "Qwen/Qwen2.5-1.5B-Instruct"  # no such folder here: a hub id, kept
    assert absolute_paths(cfg).model.name_or_path == "Qwen/Qwen2.5-1.5B-Instruct"


def test_every_actor_that_sees_the_folders_passes_and_the_marker_is_removed(ray_session, tmp_path,
                                                                             tiny_model_path):
    actors = [(f"learner rank {r}", ray_session.remote(RankRPCs).options(num_cpus=0).remote()) for r in range(2)]
    actors.append(("rollout engine 0", ray_session.remote(EngineRPCs).options(num_cpus=0).remote()))
    check_shared_storage(tmp_path / "run", tiny_model_path, actors)
    assert not (tmp_path / "run" / MARKER).exists()


def test_an_actor_that_cannot_see_the_model_folder_is_named_with_its_node(ray_session, tmp_path):
    model = tmp_path / "model"  # a folder here, without the config.json a node must read
    model.mkdir()
    actors = [("rollout engine 0", ray_session.remote(EngineRPCs).options(num_cpus=0).remote())]
    with pytest.raises(StorageError) as err:
        check_shared_storage(tmp_path / "run", str(model), actors)
    message = str(err.value)
    node = this_node()
    assert f"rollout engine 0 on node {node.ip} (host {node.hostname}" in message
    assert f"cannot read model.name_or_path file {model / 'config.json'}" in message
    assert "storage every node mounts at the same absolute path" in message


def test_a_same_named_folder_with_another_token_is_not_the_run_folder(tmp_path):
    marker = tmp_path / MARKER
    marker.write_text("another-run\n")
    assert unseen([SharedPath(str(marker), "trainer.output_dir", "this-run")]) == [
        f"{marker} (trainer.output_dir) holds another run's marker: a different folder by the same path"]
    assert unseen([SharedPath(str(marker), "trainer.output_dir", "another-run")]) == []


def test_attaching_ships_the_project_unless_the_job_already_ships_code(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = attach_runtime_env({"A": "1"})
    assert env["working_dir"] == str(PROJECT_ROOT) and ".venv/" in env["excludes"] and "runs/" in env["excludes"]
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    assert attach_runtime_env({"A": "1"}) == {"env_vars": {"A": "1"}}  # ray job submit --working-dir


def test_a_driver_attaching_by_address_runs_its_tasks_in_the_shipped_project(ray_session, tmp_path):
    """A second driver joins the session's cluster through RAY_ADDRESS from a folder outside the
    project: its task imports our packages from the shipped copy, not from this working tree."""
    script = (
        "import json, ray\n"
        "from rlhf.cluster.connect import init_ray\n"
        "init_ray()\n"
        "@ray.remote(num_cpus=0)\n"
        "def where():\n"
        "    import os, rlhf\n"
        "    return [os.getcwd(), rlhf.__file__]\n"
        "print('WHERE', json.dumps(ray.get(where.remote())))\n"
    )
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=180)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("WHERE ")]
    assert lines, out.stdout[-2000:] + out.stderr[-3000:]
    cwd, module = json.loads(lines[0][6:])
    assert "working_dir_files" in cwd and Path(module).is_relative_to(cwd), (cwd, module)
    assert not (Path(cwd) / ".venv").exists() and (Path(cwd) / "rlhf" / "cluster" / "storage.py").is_file()
