"""The schema is one source of truth for defaults, and the package's imports point one way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf.config import Config, SFTConfig
from rlhf.config.store import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_configs()


def flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def root_overrides() -> set[str]:
    """Keys conf/config.yaml sets on top of its groups (the demo's choices), e.g. learner.lr."""
    root = yaml.safe_load((CONF / "config.yaml").read_text())
    return set(flat({k: v for k, v in root.items() if k not in ("defaults", "hydra")}))


def compose_container(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="config", overrides=list(overrides)), resolve=False)


def test_python_defaults_are_the_cli_defaults():
    # Config() built in Python must equal what `python -m rlhf.train` composes, except the demo's
    # own choices in conf/config.yaml and values YAML computes from other keys (interpolations).
    cli = flat(compose_container())
    py = flat(OmegaConf.to_container(OmegaConf.structured(Config()), resolve=False))
    assert set(cli) == set(py)
    skipped = root_overrides() | {k for k, v in cli.items() if isinstance(v, str) and "${" in v}
    assert skipped == {"rollout.max_new_tokens", "learner.lr", "trainer.output_dir",
                       "learner.logprob_temperature", "learner.logprob_top_k", "learner.logprob_top_p"}
    differ = {k: (py[k], cli[k]) for k in cli if k not in skipped and py[k] != cli[k]}
    assert differ == {}, f"dataclass default vs composed YAML: {differ}"


def test_sft_defaults_are_the_sft_group_defaults():
    # sft is not in the GRPO root defaults; rlhf.distill.sft adds conf/sft/default.yaml.
    cli = flat(compose_container("+sft=default")["sft"])
    py = flat(OmegaConf.to_container(OmegaConf.structured(SFTConfig()), resolve=False))
    assert cli == py


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
    code = ("import sys, rlhf.algo.objective; "
            "print(sorted(m for m in ('hydra', 'omegaconf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
