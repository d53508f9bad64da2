"""Distillation from a teacher, and the chain that ends in GRPO.

client.py           OpenAI-compatible chat-completions client: bounded retries, back-off, the key kept out
                    of logs
cache.py            append-only response cache, so an interrupted collection resumes without paying twice
teacher_answers.py  the teacher's answers from an API (or a JSONL of them) into the SFT dataset
engine_answers.py   the teacher's answers from an open model on our own vLLM engines, written alike
collect.py          a whole collection run, whichever the teacher
sft.py              SFT run on the DeepSpeed learner: python -m rlhf.distill.sft (its loss: rlhf/algo/sft.py)
chain.py            teacher collection -> SFT -> [on-policy distillation] -> GRPO, resumable stage by stage:
                    python -m rlhf.distill.chain

The on-policy teacher, which scores the student's own samples, is rollouts/opd_teacher.py.
"""
