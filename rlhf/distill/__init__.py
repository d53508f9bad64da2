"""Distillation from a teacher, and the chain that ends in GRPO.

client.py    OpenAI-compatible chat-completions client: bounded retries, back-off, the key kept out of logs
cache.py     append-only response cache, so an interrupted collection resumes without paying twice
teacher.py   collect the teacher's answers (or read a JSONL of them) into the SFT dataset
sft_loss.py  completion-token cross-entropy for one micro-batch (pure tensor function)
sft.py       SFT run on the DeepSpeed learner: python -m rlhf.distill.sft
chain.py     teacher collection -> SFT -> GRPO, resumable stage by stage: python -m rlhf.distill.chain
"""
