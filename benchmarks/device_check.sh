#!/usr/bin/env bash
# The GPU checks in one prepared call, for a session lent a device machine (its image has python3 with torch,
# transformers, peft, safetensors, opt-einsum, rich and pytest; nothing is installed). From the repository root:
#
#     bash benchmarks/device_check.sh            # logs and results under $OUT (the device tool's), else /tmp/device-check
#
# 1. the CUDA tests (tests/test_devices.py: every entry point on CUDA equals the CPU, device sampling, pinned
#    side-stream copies), 2. the LoRA GPT-2 tokens/s benchmark in bfloat16 autocast, 3. the EK-FAC fit breakdown on
# the GPU. Each has its own time limit (about 8 minutes in all), so one failing part leaves the others' results.
set -uo pipefail
out=${OUT:-/tmp/device-check}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
status=0
nvidia-smi -L
"$py" -c "import torch, transformers, peft; print('torch', torch.__version__, '·', torch.cuda.get_device_name(), \
'· transformers', transformers.__version__, '· peft', peft.__version__)" || exit 1
run() {  # run LIMIT LOG COMMAND...: one part, its output kept in $out/LOG
    local limit=$1 log=$2
    shift 2
    echo "==> $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$log" || { status=1; echo "==> failed or timed out: $*"; }
}
run 180 cuda-tests.log "$py" -m pytest -q -p no:cacheprovider tests/test_devices.py
run 180 lora-gpt2.log "$py" benchmarks/lora_gpt2.py --device cuda
cp benchmarks/results/lora-gpt2-cuda.md "$out/" 2>/dev/null
run 120 ekfac-breakdown-cuda.log "$py" benchmarks/ekfac_breakdown.py --device cuda --repeats 3
exit $status
