"""Hydra composition, the structured schema, and the batch arithmetic checks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from rlhf.config import Config, ConfigError
from rlhf.config.store import register_configs, to_object
from rlhf.validation import validate

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_configs()


def composed(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_object(compose(config_name="config", overrides=list(overrides)))


def test_default_config_composes_and_validates():
    cfg = composed()
    plan = validate(cfg)
    # Demo arithmetic: 16 prompts x 8 samples = 128 samples, one update, micro-batches of 16 on 1 rank.
    assert (cfg.trainer.prompts_per_step, cfg.rollout.n) == (16, 8)
    assert plan.samples_per_step == 128
    assert plan.grad_accum_steps == 128 // cfg.learner.micro_batch_size
    assert cfg.model.trust_remote_code is False


@pytest.mark.parametrize("group", sorted(p.name for p in CONF.iterdir() if p.is_dir()))
def test_every_group_option_composes(group):
    for option in sorted((CONF / group).glob("*.yaml")):
        if group == "experiment":
            # Experiments with a teacher ask for it: the model and the prompts file are the user's.
            defaults = OmegaConf.load(option).get("defaults", [])
            asks_teacher = any("/teacher" in d for d in defaults if isinstance(d, DictConfig))
            teacher = ["teacher.model=m", "teacher.path=/p.jsonl"] if asks_teacher else []
            cfg = composed(f"+experiment={option.stem}", *teacher)
        else:
            overrides = [f"{group}={option.stem}"]
            if group == "model" and option.stem == "hf":
                overrides.append("model.name_or_path=/some/folder")
            if group == "data" and option.stem == "files":
                overrides.append("data.path=/some/file.jsonl")
            if group == "teacher":  # not in the GRPO root defaults; the distil experiment adds it
                overrides = [f"+teacher={option.stem}", "teacher.model=m", "teacher.path=/p.jsonl"]
            if group == "sft":  # likewise: python -m rlhf.distill.sft and the chain read it
                overrides = [f"+sft={option.stem}"]
            cfg = composed(*overrides)
        validate(cfg)



def test_model_hf_without_a_model_is_refused_by_name():
    # hydra's ??? in conf/model/hf.yaml could not override the schema's default, so `model=hf` alone
    # used to train SmolLM2 without a word; now the empty name is refused by every entry point's checks.
    from rlhf.cluster.startup import prepare

    cfg = composed("model=hf")
    assert cfg.model.name_or_path == ""
    with pytest.raises(ConfigError, match=r"model\.name_or_path is not set"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"model\.name_or_path is not set"):
        prepare(cfg)  # rlhf.distill.sft's start-up, which has no GRPO validate()

def test_misspelt_key_fails_at_composition_naming_it():
    with pytest.raises(ConfigCompositionException, match="stepz"):
        composed("trainer.stepz=3")


def test_wrong_type_fails_at_composition_naming_the_key():
    with pytest.raises((ConfigCompositionException, ValidationError), match="prompts_per_step"):
        composed("trainer.prompts_per_step=many")


def test_misspelt_key_in_a_group_file_fails(tmp_path):
    # A copy of conf/ with one misspelt key in a group file: the schema rejects it.
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "trainer" / "default.yaml").write_text("defaults:\n  - base_trainer\n  - _self_\nstepss: 3\n")
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="stepss"):
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            compose(config_name="config")


@pytest.mark.parametrize(
    "overrides, message",
    [
        # 3 prompts x 8 samples = 24 samples do not split into 5 mini-batches.
        (["trainer.prompts_per_step=3", "algo.mini_batches_per_step=5"], "algo.mini_batches_per_step=5"),
        # 16 x 8 = 128 samples, one mini-batch, 3 ranks: 128 % 3 = 2.
        (["learner.num_ranks=3"], "learner.num_ranks=3"),
        # 128 samples on one rank in micro-batches of 48: 128 % 48 = 32.
        (["learner.micro_batch_size=48"], "learner.micro_batch_size=48"),
        # A group of one sample has no baseline to compare against.
        (["rollout.n=1"], "rollout.n=1"),
        (["trainer.prompts_per_step=0"], "trainer.prompts_per_step=0"),
        (["trainer.max_restarts=-1"], "trainer.max_restarts=-1 must be >= 0"),
        (["rollout.max_new_tokens=0"], "rollout.max_new_tokens=0"),
        (["rollout.max_engine_restarts=-1"], "rollout.max_engine_restarts=-1 must be >= 0"),
        (["algo.dual_clip=0.5"], "algo.dual_clip=0.5"),
        (["learner.zero_stage=4"], "learner.zero_stage=4"),
        # arithmetic's 128 prompt tokens + 64 new tokens > 150.
        (["rollout.max_model_len=150"], "rollout.max_model_len=150"),
        # vLLM's core-list syntax only: "two" is not a core id.
        (["rollout.cpu_threads_bind=0-two"], "rollout.cpu_threads_bind='0-two'"),
        # Names looked up in the registries before anything starts, not at the first step.
        (["algo.advantage=grpoo"], "algo.advantage='grpoo'"),
        (["algo.policy_loss=ppo"], "algo.policy_loss='ppo'"),
        (["algo.loss_agg=mean"], "algo.loss_agg='mean'"),
        # Checked even with kl_coef=0: a misspelt name is a typo whether or not it is used yet.
        (["algo.kl_estimator=k4"], "algo.kl_estimator='k4'"),
        # Reward specs resolve to functions (imported, not built) before start-up.
        (["reward.functions=[{fn: math_answr}]"], "reward.functions[0].fn"),
        (["reward.functions=[{fn: 'rewards.builtin.math_answer:Nope'}]"], "reward.functions[0].fn"),
        (["reward.functions=[{fn: '/no/such/rewards.py:score'}]"], "reward.functions[0].fn"),
        # A required parameter no column fills (the data has no `solution`): refused before start-up.
        ([f"reward.functions=[{{fn: '{ROOT.as_posix()}/tests/support/eval_rewards.py:needs_solution'}}]"],
         "solution"),
    ],
)
def test_impossible_batch_arithmetic_names_keys(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(composed(*overrides))


def test_rloo_needs_two_samples_but_micro_batch_larger_than_shard_is_fine():
    # 2 prompts x 2 samples = 4 samples on 1 rank; micro_batch_size 16 > 4 just means one micro-batch.
    plan = validate(composed("algo=rloo", "trainer.prompts_per_step=2", "rollout.n=2"))
    assert (plan.micro_batch_size, plan.grad_accum_steps) == (4, 1)


def test_cfg_job_prints_config_without_loading_anything():
    out = subprocess.run(
        [sys.executable, "-m", "rlhf.train", "--cfg", "job", "algo=dr_grpo", "rollout.n=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "advantage: dr_grpo" in out.stdout
    assert "'n': 4" in out.stdout  # YAML quotes n (it could read as a boolean)


def test_plan_mode_prints_arithmetic_and_memory(tiny_model_path, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "rlhf.train", "plan=true", "model=tiny", "learner=zero3",
         "learner.num_ranks=2", f"trainer.output_dir={tmp_path}/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr
    assert "16 x samples/prompt 8 = 128 samples/step" in out.stdout
    assert "ZeRO-3" in out.stdout
    assert "per learner rank" in out.stdout


@pytest.mark.parametrize("override, message", [
    ("algo.advantage=grpoo", "algo.advantage='grpoo' is not a registered advantage estimator"),
    ("reward.functions=[{fn: math_answr}]", "reward.functions[0].fn"),
])
def test_plan_mode_rejects_unknown_names(tmp_path, override, message):
    # Before: plan=true printed a plan and exited 0; the run failed after engines had started.
    out = subprocess.run(
        [sys.executable, "-m", "rlhf.train", "plan=true", override, f"trainer.output_dir={tmp_path}/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr


def test_plan_mode_rejects_impossible_plan(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "rlhf.train", "plan=true", "learner.num_ranks=3",
         f"trainer.output_dir={tmp_path}/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode != 0
    assert "learner.num_ranks=3" in out.stderr
