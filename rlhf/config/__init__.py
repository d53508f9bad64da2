"""Configuration schema (``rlhf.config.schema``), re-exported: ``from rlhf.config import RolloutConfig``.

The package is the bottom floor: it imports nothing of ours, so every component can use its
dataclasses. Beside it, each with one job:

- ``rlhf.config.batches``: the batch arithmetic (``plan_batches`` -> ``BatchPlan``), pure;
- ``rlhf.config.store``: registering the schema with hydra, and the composed config as dataclasses;
- ``rlhf.validation`` (a floor up): every rule that needs a registry or a component.
"""

from rlhf.config.schema import (
    MISSING,
    AgentConfig,
    AlgoConfig,
    ArithmeticTaskConfig,
    CompareConfig,
    Config,
    ConfigError,
    DataConfig,
    EngineConfig,
    EnvConfig,
    GatewayConfig,
    LearnerConfig,
    LedgerConfig,
    LoraConfig,
    ModelConfig,
    RewardConfig,
    RewardFnConfig,
    RolloutConfig,
    SFTConfig,
    TeacherConfig,
    TrainerConfig,
)

__all__ = [
    "MISSING",
    "AgentConfig",
    "AlgoConfig",
    "ArithmeticTaskConfig",
    "CompareConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "EnvConfig",
    "GatewayConfig",
    "LearnerConfig",
    "LedgerConfig",
    "LoraConfig",
    "ModelConfig",
    "RewardConfig",
    "RewardFnConfig",
    "RolloutConfig",
    "SFTConfig",
    "TeacherConfig",
    "TrainerConfig",
]
