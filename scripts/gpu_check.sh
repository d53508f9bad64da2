#!/usr/bin/env bash
# One-shot learner check on a rented GPU machine (H100/H200): DeepSpeed ZeRO-2/3 with NCCL and
# bf16 on CUDA, the same LearnerRank code the Ray actors run (no Ray there, so torchrun drives it).
#
# The machine has torch and transformers but no DeepSpeed, hydra, Ray or internet. Prepare once on
# a machine with pip (ignored folders, see .git/info/exclude):
#   .whl/         deepspeed 0.19.8 (wheel built from its sdist) + hjson, pydantic(+core, annotated-types,
#                 typing-inspection, typing_extensions), hydra-core, omegaconf, antlr4 runtime
#   .gpu_assets/  tiny-random-llama (cp -r ~/.cache/rlhf/models/tiny-random-llama .gpu_assets/)
# Then run it once, carrying both folders (device tool): command "bash scripts/gpu_check.sh",
# carry [".whl", ".gpu_assets"], timeout_s 420. It takes ~2-4 minutes; results are printed and
# written to $OUT/gpu_check.log.
#
# GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh   runs the same steps on CPU with gloo (no install,
# the project venv, a smaller benchmark model) to check this script before spending GPU time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 OMP_NUM_THREADS=4

MODEL=.gpu_assets/tiny-random-llama
if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]]; then
    PY=.venv/bin/python
    EXTRA=(--dry-run-cpu)
    BENCH=(--bench-layers 1 --bench-hidden 256 --bench-rows 1)
    [[ -d $MODEL ]] || MODEL=$HOME/.cache/rlhf/models/tiny-random-llama
else
    PY=python3
    EXTRA=()
    BENCH=()
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 2
    [[ -d $MODEL ]] || { echo "missing $MODEL: carry .gpu_assets"; exit 2; }
    ls .whl/*.whl >/dev/null 2>&1 || { echo "missing .whl/*.whl: carry .whl"; exit 2; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 2; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'cuda', torch.cuda.is_available())" || exit 2

status=0
run() {  # one torchrun per check: a fresh process group and DeepSpeed state each time
    echo "=== $*"
    timeout 200 $PY -m torch.distributed.run --standalone --nproc_per_node 1 \
        scripts/gpu_learner_check.py --model "$MODEL" "${EXTRA[@]}" "$@" || status=1
}
run --check 2
run --check 3
run --bench 2 "${BENCH[@]}"
run --bench 3 "${BENCH[@]}"
echo "=== gpu_check exit status $status"
exit $status
