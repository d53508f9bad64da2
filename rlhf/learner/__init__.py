"""The learner: DeepSpeed ZeRO ranks as Ray actors, the sending half of weight sync, checkpoints and export.

ds_config.py       DeepSpeed config dicts (policy, frozen reference) from LearnerConfig
optim.py           AdamW parameter groups and the warm-up + constant/cosine LR schedule
settings.py        learner settings (and the objective's name) checked before any process starts
packing.py         a rank's rows as forward passes: micro-batches by token budget, shared prompts once
weights.py         full parameters out of (ZeRO-3 sharded) models, in buckets, as safetensors
lora.py            LoRA (peft): wrapping the policy, merged weights under the HF names, the adapter export
rank_metrics.py    RankMetrics: train_step metrics over micro-batches and ranks, as they cross Ray
rendezvous.py      where the ranks meet: rank 0's node address and a port it holds, listened on there only
waiting.py         waiting on named Ray actors with deadlines: the first to fail or stall is named
rank.py            LearnerRank: one rank's engines, train_step, log-probs, checkpoint and weight RPCs
group.py           LearnerGroup: the actors, fan-out with deadlines, weight sync with the probe check
sync.py            weight sync's sending half: one interface, the files and broadcast transports
sync_broadcast.py  the broadcast transport on every rank (rank 0 sends)
checkpoint.py      atomic, verified run checkpoints (<run>/checkpoints/step-N) and resuming from them
export.py          the Hugging Face export that transformers and vLLM load, from the group or a checkpoint
"""

from rlhf.learner.group import LearnerError, LearnerGroup, WeightSyncError
from rlhf.learner.rank import LearnerRank
from rlhf.learner.rank_metrics import RankMetrics, reduce_metrics

__all__ = ["LearnerError", "LearnerGroup", "LearnerRank", "RankMetrics", "WeightSyncError", "reduce_metrics"]
