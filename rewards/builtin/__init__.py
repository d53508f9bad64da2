"""Built-in rewards, registered by name in :data:`rewards.api.BUILTINS`."""
