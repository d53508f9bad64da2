"""Built-in environments, named in rollouts/env/api.py's BUILTINS."""
