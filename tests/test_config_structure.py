"""Each default is written once, in the schema; the package's imports point one way.

Defaults and their documentation live in rlhf/config/schema.py. A group file under conf/ states
only what its option changes, so a key it sets that equals the value it would inherit (the schema
default, or the option it builds on through its defaults list) is an error naming the file and key.
``OPTIONS`` pins what each option composes to: the schema plus these changes, the values every
option composed to before the group files stopped restating the defaults (issue 25).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf.config import AlgoConfig, Config
from rlhf.config.store import GROUPS, register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_configs()

# Group -> its schema; rollout_correction's files are `# @package algo` settings of AlgoConfig.
SCHEMAS = {**GROUPS, "rollout_correction": AlgoConfig}
PACKAGE = {"rollout_correction": "algo"}
FILES = sorted(p for p in CONF.glob("*/*.yaml") if p.parent.name != "experiment")

# What each option changes from the schema defaults, as composed (parents included).
OPTIONS: dict[str, dict] = {
    "agent/calculator": {"name": "calculator", "kwargs": {"answer_column": "answer", "max_turns": 3}, "max_calls": 3},
    "agent/none": {},
    "algo/dapo": {"loss_agg": "token_mean", "clip_high": 0.28, "dynamic_sampling": True},
    "algo/dr_grpo": {"advantage": "dr_grpo", "loss_agg": "seq_mean_token_sum_norm",
                     "norm_length": "${rollout.max_new_tokens}"},
    "algo/grpo": {},
    "algo/gspo": {"policy_loss": "gspo", "clip_low": 3e-4, "clip_high": 4e-4},
    "algo/reinforce_pp": {"advantage": "reinforce_pp", "loss_agg": "token_mean", "kl_estimator": "k2"},
    "algo/rloo": {"advantage": "rloo"},
    "data/arithmetic": {},
    "data/files": {"source": "files", "max_prompt_tokens": 256},
    "data/gsm8k": {"source": "gsm8k", "max_prompt_tokens": 384, "system_prompt": (
        "Solve the problem step by step. End with the final answer on its own line as '#### <number>'.")},
    "env/calculator": {"name": "calculator", "kwargs": {"answer_column": "answer"}, "max_turns": 3,
                       "max_tool_tokens": 64, "max_total_tokens": 256},
    "env/none": {},
    "gateway/default": {},
    "learner/gpu_zero2": {"backend": "nccl", "num_threads": 4, "num_cpus_per_rank": 2.0, "num_gpus_per_rank": 1.0},
    "learner/gpu_zero3": {"num_ranks": 2, "zero_stage": 3, "backend": "nccl", "num_threads": 4,
                          "num_cpus_per_rank": 2.0, "num_gpus_per_rank": 1.0},
    "learner/zero2": {},
    "learner/zero3": {"num_ranks": 2, "zero_stage": 3},
    "learner/zero3_offload": {"num_ranks": 2, "zero_stage": 3, "offload_optimizer": True, "offload_params": True,
                              "backend": "nccl", "gradient_checkpointing": True, "share_prompt": False,
                              "num_threads": 4, "num_cpus_per_rank": 2.0, "num_gpus_per_rank": 1.0,
                              "pin_memory": True},
    "ledger/default": {},
    "model/hf": {"dtype": "bfloat16", "name_or_path": ""},  # empty: required, refused by name
    "model/smollm2": {},
    "model/tiny": {"name_or_path": "tiny-random-llama"},
    "reward/format_math": {"timeout_s": 15.0, "functions": [
        {"fn": "math_answer", "weight": 1.0, "kwargs": {"mode": "tag", "symbolic": True}, "name": None},
        {"fn": "format", "weight": 0.2, "kwargs": {"tags": ["think", "answer"], "partial_credit": True},
         "name": None}]},
    "reward/gsm8k": {"functions": [
        {"fn": "math_answer", "weight": 1.0, "kwargs": {"mode": "gsm8k"}, "name": None},
        {"fn": "math_answer", "weight": 0.0, "kwargs": {"mode": "last_number"}, "name": "last_number_correct"}]},
    "reward/judge": {"timeout_s": 300.0, "agreement": ["judge", "math_answer"], "functions": [
        {"fn": "judge", "weight": 1.0, "name": None, "kwargs": {
            "rubric": "arithmetic_reference", "scale": [0, 1], "base_url": "http://127.0.0.1:8000/v1",
            "model": "judge", "api_key_env": "JUDGE_API_KEY", "max_tokens": 64}},
        {"fn": "math_answer", "weight": 0.0, "kwargs": {"mode": "last_number"}, "name": None}]},
    "reward/math": {},
    "rollout/vllm_cpu": {},
    "rollout/vllm_gpu": {"max_model_len": 2048, "kv_cache_gb": None, "gpu_memory_utilization": 0.5,
                         "enforce_eager": False, "sleep_between_steps": True, "reproducible": False,
                         "num_cpus_per_engine": 1.0, "num_gpus_per_engine": 1.0, "probe_tolerance": 0.05,
                         "probe_tolerance_bf16": 0.05, "max_new_tokens": 256},
    "rollout_correction/icepop": {"rollout_correction": "icepop"},
    "rollout_correction/none": {},
    "rollout_correction/seq_mask": {"rollout_correction": "seq_mask"},
    "rollout_correction/tis": {"rollout_correction": "tis"},
    "rollout_correction/token_reject": {"rollout_correction": "token_reject"},
    "sft/default": {},
    "teacher/api": {"base_url": "https://api.openai.com/v1"},
    "teacher/engines": {"source": "engines", "max_tokens": 128},
    "teacher/jsonl": {"source": "jsonl"},
    # api's, with the schema's local endpoint back and no key
    "teacher/vllm_local": {"api_key_env": None},
    "trainer/default": {},
}


def flat(tree: dict, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value; lists, and dicts with no keys, are values."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def container(node) -> dict:
    return OmegaConf.to_container(node, resolve=False)


def schema_default(group: str):
    return OmegaConf.structured(SCHEMAS[group])


def compose_option(group: str, option: str) -> dict:
    """The group's section as hydra composes the option on its own (its defaults list included)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        section = compose(config_name=f"{group}/{option}")[PACKAGE.get(group, group)]
    return container(OmegaConf.merge(schema_default(group), section))


def own_keys(path: Path) -> tuple[dict, list[str]]:
    """What the file itself sets (flattened), and the options its defaults list builds on."""
    raw = yaml.safe_load(path.read_text()) or {}
    parents = [d for d in raw.pop("defaults", []) if d not in ("_self_", f"base_{path.parent.name}")]
    return flat(raw), parents


def compose_container(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return container(compose(config_name="config", overrides=list(overrides)))


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_group_file_states_only_what_it_changes(path):
    group = path.parent.name
    keys, parents = own_keys(path)
    assert len(parents) <= 1, f"{path.relative_to(ROOT)} builds on {parents}: one option at most"
    inherited = flat(compose_option(group, parents[0]) if parents else container(schema_default(group)))
    composed = flat(compose_option(group, path.stem))
    what = f"option {parents[0]}" if parents else f"default (rlhf/config/schema.py {SCHEMAS[group].__name__})"
    # A key not in `composed` was set to ??? (MISSING), which a merge never applies: it changes nothing.
    restated = [f"{key}: {value!r}" for key, value in keys.items()
                if composed.get(key, inherited.get(key)) == inherited.get(key, "<absent>")]
    assert restated == [], f"{path.relative_to(ROOT)} restates the {what}: {restated}; delete those lines"


def test_every_group_file_says_what_its_option_is():
    for path in FILES:
        first = [line for line in path.read_text().splitlines() if not line.startswith("# @package")][0]
        assert first.startswith("# "), f"{path.relative_to(ROOT)} starts without a comment saying what it is"


def test_each_option_composes_as_pinned():
    assert {f"{p.parent.name}/{p.stem}" for p in FILES} == set(OPTIONS), "a new option needs its OPTIONS entry"
    for name, changes in OPTIONS.items():
        group, option = name.split("/")
        expected = flat(container(OmegaConf.merge(schema_default(group), changes)))
        assert flat(compose_option(group, option)) == expected, name


def test_python_defaults_are_the_cli_defaults():
    # Config() built in Python must equal what `python -m rlhf.train` composes, except the demo's
    # own choices in conf/config.yaml (rollout.max_new_tokens, learner.lr).
    cli = flat(compose_container())
    py = flat(container(OmegaConf.structured(Config())))
    assert set(cli) == set(py)
    differ = {k: (py[k], cli[k]) for k in cli if py[k] != cli[k]}
    assert differ == {"rollout.max_new_tokens": (64, 48), "learner.lr": (1e-5, 2e-5)}


def test_cfg_job_prints_every_key():
    # Group files state only their changes; `--cfg job` shows the whole composed config.
    out = subprocess.run([sys.executable, "-m", "rlhf.train", "--cfg", "job", "learner=zero3_offload"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    printed = flat(yaml.safe_load(out.stdout))
    assert set(printed) == set(flat(container(OmegaConf.structured(Config()))))
    assert (printed["learner.num_ranks"], printed["learner.share_prompt"], printed["learner.sync_dir"]) == (
        2, False, "/dev/shm")


def _imports(path: Path) -> set[str]:
    """Every module of ours a file imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.split(".")[0] in ("rlhf", "rewards", "rollouts")}


def test_the_schema_imports_nothing_of_ours():
    for path in sorted((ROOT / "rlhf" / "config").glob("*.py")):
        ours = {m for m in _imports(path) if not m.startswith("rlhf.config")}
        assert ours == set(), f"{path.name} imports {ours}"


def test_no_import_circles():
    # Module graph over rlhf/ rewards/ rollouts/ (imports inside functions included): no cycle.
    modules = {}
    for pkg in ("rlhf", "rewards", "rollouts"):
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path

    def resolve(target: str) -> str | None:
        while target and target not in modules:  # `from pkg.mod import name` names a module or attr
            target = target.rpartition(".")[0]
        return target or None

    graph = {m: {r for t in _imports(p) if (r := resolve(t)) and r != m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_algorithm_math_imports_neither_hydra_nor_omegaconf():
    # Pure tensor math: importing the objective must not drag the config framework in.
    code = ("import sys, rlhf.algo.grpo; "
            "print(sorted(m for m in ('hydra', 'omegaconf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
