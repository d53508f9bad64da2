"""Built-in prompt tasks: each builds a ``datasets.Dataset`` with ``prompt`` and ``answer`` columns.

arithmetic.py  generated problems such as "What is 3 + 5?" with their answers
gsm8k.py       GSM8K grade-school maths: the question, the final number, the worked solution
"""
