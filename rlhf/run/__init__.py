"""What a run writes and shows.

metrics.py   where metrics go: a JSONL file, TensorBoard, wandb when asked for, and a progress line
timeline.py  when each phase ran: <run>/timeline.jsonl, one line per span
plot.py      the run's picture: training reward and held-out accuracy over steps, as a PNG
ledger.py    the cost ledger: what a run consumed and what it cost, <run>/ledger.json
rng.py       every RNG's state captured and restored as JSON-friendly data
mismatch.py  the sampler/learner mismatch limit that can stop a run

Checkpoints are the learner's (``rlhf/learner/checkpoint.py``); they carry this package's state as
client state.
"""
