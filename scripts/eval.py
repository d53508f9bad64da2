"""Evaluate any HF checkpoint: a thin wrapper over ``python -m rlhf.eval`` (same hydra overrides)."""

from rlhf.eval import main

if __name__ == "__main__":
    main()
