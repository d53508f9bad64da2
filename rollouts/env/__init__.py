"""Environments for multi-turn, tool-using rollouts: the API (api.py), tools as typed functions
(tools.py), observation turns as token ids (chat.py), trajectories (trajectory.py), built-ins."""
