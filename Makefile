# The two commands. Each sets up what it needs (idempotent): a project-local .venv with the CPU
# stack, the CUDA torchvision/torchaudio/torchcodec removed, and the converted SmolLM2 cached.
PY := .venv/bin/python

.PHONY: setup demo test test-all

setup:
	scripts/setup_env.sh

# The demo: GRPO on SmolLM2-135M-Instruct, arithmetic task, before/after evaluation.
demo: setup
	$(PY) -m rlhf.train

# The test suite CI runs (slow tests with the real model excluded; `make test-all` includes them).
test: setup
	$(PY) -m pytest -m "not slow" -p no:cacheprovider

test-all: setup
	$(PY) -m pytest -p no:cacheprovider
