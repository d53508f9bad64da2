"""Distillation from a teacher, and the chain that ends in GRPO.

teacher_answers.py  the teacher's answers from an API (or a JSONL of them) into the SFT dataset
engine_answers.py   the teacher's answers from an open model on our own vLLM engines, written alike
collect.py          a whole collection run, whichever the teacher
sft.py              SFT run on the DeepSpeed learner: python -m rlhf.distill.sft (its loss: rlhf/algo/sft.py)
chain.py            teacher collection -> SFT -> [on-policy distillation] -> GRPO, resumable stage by stage:
                    python -m rlhf.distill.chain

Requests to an API teacher go through rlhf/chat/ (the client and cache the judge shares).
The on-policy teacher, which scores the student's own samples, is rollouts/opd_teacher.py.
"""
