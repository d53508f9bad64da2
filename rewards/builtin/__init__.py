"""Built-in rewards, registered by name in :data:`rewards.api.BUILTINS`.

math_answer.py   1.0 when the completion's final answer equals the reference answer
symbolic.py      symbolic answer equivalence through math-verify, in a child process that can be killed
format.py        whether the completion follows the required layout
length.py        penalties on completion length
code_exec.py     the fraction of a row's tests that the completion's code passes (in the sandbox)
reward_model.py  scores from a Hugging Face sequence-classification model in a Ray actor
judge.py         an LLM grades each completion against a rubric (pointwise, pairwise, criteria)
judge_rubric.py  rubric files: placeholders checked at load, rendered per sample
judge_parse.py   the judge's reply read as a score or verdict; pairwise and criteria arithmetic
judge_http.py    the judge backend interface, and the judge over an OpenAI-compatible endpoint
"""
