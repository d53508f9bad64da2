"""Environments for multi-turn, tool-using rollouts.

api.py         what an environment is, and how ``env.name`` becomes one
tools.py       tools as plain typed Python functions, and an environment whose actions are tool calls
chat.py        observation turns as token ids, appended to what the engine sampled (never a re-render)
trajectory.py  one multi-turn trajectory as token ids, built turn by turn
builtin/       the built-in environments (calculator)
"""
