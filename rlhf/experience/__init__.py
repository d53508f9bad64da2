"""The path from prompt to TrainBatch, one room, shared by training and evaluation.

In the order a step runs it:

- ``prompts`` (and ``tasks/``): load, prepare and serve the prompt rows;
- ``episodes``: the one generation loop, any number of turns (environments are its multi-turn case);
- ``agents`` (and ``agent_api``): the other way to make the same episodes: an application calls the
  policy through the gateway (rollouts/gateway/), with its limits and counted failures;
- ``scoring``: every reward rule: which columns a reward sees, the reward functions, the environment's
  reward and its None rule;
- ``producer``: one step's rollouts (draw, generate, score, refill, teacher), now or ahead of the learner;
- ``batching``: scored rollouts as the learner's padded ``TrainBatch``;
- ``heldout``: held-out accuracy and pass@k through the same episodes and scoring.
"""
