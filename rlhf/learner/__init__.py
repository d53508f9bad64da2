"""The learner: DeepSpeed ZeRO ranks as Ray actors.

ds_config.py     DeepSpeed config dicts (policy, frozen reference) from LearnerConfig
optim.py         AdamW parameter groups and the warm-up + constant/cosine LR schedule
settings.py      learner settings checked before any process starts
weights.py       full parameters out of (ZeRO-3 sharded) models, in buckets, as safetensors
lora.py          LoRA (peft): wrapping the policy, merged weights under the HF names, the adapter export
rank_metrics.py  RankMetrics: train_step metrics over micro-batches and ranks, as they cross Ray
rendezvous.py    where the ranks meet: rank 0's node address and a port it holds, listened on there only
rank.py          LearnerRank: one rank's engines, train_step, log-probs, checkpoint and weight RPCs
group.py         LearnerGroup: the actors, fan-out with deadlines, weight sync with the probe check
"""

from rlhf.learner.group import LearnerError, LearnerGroup, WeightSyncError
from rlhf.learner.rank import LearnerRank
from rlhf.learner.rank_metrics import RankMetrics, reduce_metrics

__all__ = ["LearnerError", "LearnerGroup", "LearnerRank", "RankMetrics", "WeightSyncError", "reduce_metrics"]
