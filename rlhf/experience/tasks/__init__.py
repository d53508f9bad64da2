"""Built-in prompt tasks: each builds a ``datasets.Dataset`` with ``prompt`` and ``answer`` columns."""
