"""What a run writes and shows: metrics (``metrics``), the phase timeline (``timeline``), the reward and
accuracy picture (``plot``), the cost ledger (``ledger``), every RNG's state (``rng``) and the
sampler/learner mismatch limit that can stop a run (``mismatch``). Checkpoints are the learner's
(``rlhf/learner/checkpoint.py``); they carry this package's state as client state."""
