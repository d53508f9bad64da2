"""Built-in rewards, registered by name in :data:`rewards.api.BUILTINS`.

math_answer.py   1.0 when the completion's final answer equals the reference answer
symbolic.py      symbolic answer equivalence through math-verify, in a child process that can be killed
format.py        whether the completion follows the required layout
length.py        penalties on completion length
code_exec.py     the fraction of a row's tests that the completion's code passes (in the sandbox)
reward_model.py  scores from a Hugging Face sequence-classification model in a Ray actor
"""
