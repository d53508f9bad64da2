"""Rollouts: vLLM engines in Ray actors, and the receiving half of weight sync.

engine.py       RolloutEngine: one vLLM engine in a Ray actor (generate, score, load weights)
group.py        EngineGroup: the data-parallel engines behind one call per operation, with deadlines
requests.py     a generation request checked and turned into vLLM's terms
sync.py         weight sync's receiving half: methods that run inside each vLLM worker process
opd_teacher.py  on-policy distillation's teacher: an open model on engines of its own, scoring the
                student's tokens
env/            environments for multi-turn, tool-using rollouts
"""
