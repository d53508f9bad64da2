"""Built-in environments, named in rollouts/env/api.py's BUILTINS.

calculator.py  a calculator tool for multi-step arithmetic and GSM8K"""
