"""The schema registered with hydra, and a composed config turned back into dataclasses."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from rlhf.config.schema import (
    AgentConfig,
    AlgoConfig,
    CompareConfig,
    Config,
    DataConfig,
    EnvConfig,
    GatewayConfig,
    LearnerConfig,
    LedgerConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    SFTConfig,
    TeacherConfig,
    TrainerConfig,
)

# Config group -> its schema; each group file names ``base_<group>`` in its defaults list.
GROUPS = {
    "model": ModelConfig,
    "data": DataConfig,
    "rollout": RolloutConfig,
    "learner": LearnerConfig,
    "algo": AlgoConfig,
    "reward": RewardConfig,
    "env": EnvConfig,
    "agent": AgentConfig,
    "gateway": GatewayConfig,
    "trainer": TrainerConfig,
    "teacher": TeacherConfig,
    "ledger": LedgerConfig,
    "sft": SFTConfig,
    "compare": CompareConfig,
}


def register_configs() -> None:
    """Register the schema so hydra type-checks every group file against it."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, node in GROUPS.items():
        cs.store(group=group, name=f"base_{group}", node=node)


def to_object(cfg: DictConfig) -> Config:
    """The composed DictConfig as typed dataclasses."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    return obj
