"""The learner: DeepSpeed ZeRO ranks as Ray actors.

ds_config.py  DeepSpeed config dicts (policy, frozen reference) from LearnerConfig
optim.py      AdamW parameter groups and the warm-up + constant/cosine LR schedule
settings.py   learner settings checked before any process starts
weights.py    full parameters out of (ZeRO-3 sharded) models, in buckets, as safetensors
rank.py       LearnerRank: one rank's engines, train_step, log-probs, checkpoint and weight RPCs
group.py      LearnerGroup: the actors, fan-out with deadlines, weight sync with the probe check
"""

from rlhf.learner.group import LearnerError, LearnerGroup, WeightSyncError, reduce_metrics
from rlhf.learner.rank import LearnerRank

__all__ = ["LearnerError", "LearnerGroup", "LearnerRank", "WeightSyncError", "reduce_metrics"]
